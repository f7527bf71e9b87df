"""Resolve the native frames of segv_trace.so crash reports in a log into functions and lines.

    python3 tests/gpu/diag/resolve_frames.py LOG > RESOLVED.txt

A frame reads `/path/lib.so(+0xOFFSET)[0xADDRESS]` (backtrace_symbols_fd); each distinct
(object, offset) is passed once to `addr2line -C -f -i`. Build the library with debug information
(SKBUILD_CMAKE_BUILD_TYPE=RelWithDebInfo) for file and line numbers of gfcoll's own frames.
"""

import re
import subprocess
import sys

kFrame = re.compile(r"^(/\S+?\.so[\w.]*)\(([^)]*)\)\[(0x[0-9a-f]+)\]")


def main(path: str) -> None:
    seen: set[tuple[str, str]] = set()
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("[segv_trace]"):
                print(line.rstrip())
            m = kFrame.match(line.strip())
            if not m:
                continue
            obj, sym = m.group(1), m.group(2)
            off = sym[1:] if sym.startswith("+") else None
            if off is None or (obj, off) in seen:
                print(f"  {obj} {sym}")
                continue
            seen.add((obj, off))
            r = subprocess.run(
                ["addr2line", "-C", "-f", "-i", "-e", obj, off], capture_output=True, text=True
            )
            print(f"  {obj} {off}: {' | '.join(r.stdout.split())}")


if __name__ == "__main__":
    main(sys.argv[1])
