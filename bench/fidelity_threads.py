"""CPU-seconds per thread of a process and its descendants, from Linux /proc, as JSON
{"pid/tid/thread name": seconds}; two snapshots around a replay show which threads of a server
(rank 0's worker, control thread, HTTP event loop, encoder pool, ZeroMQ I/O) use the cores:
    python bench/fidelity_threads.py SERVER_PID before.json
    gfdit bench run --url URL --trace TRACE --out RUN
    python bench/fidelity_threads.py SERVER_PID after.json
"""

import json
import os
import sys

from gfdit.eval.fidelity import threads_cpu_s


def snapshot(root: int) -> dict[str, float]:
    parent = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    parent[int(e)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, todo = [], [root]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, q in parent.items() if q == p]
    out = {}
    for p in tree:
        for t, (name, cpu) in threads_cpu_s(p).items():
            out[f"{p}/{t}/{name}"] = cpu
    return out


if __name__ == "__main__":
    with open(sys.argv[2], "w") as f:
        json.dump(snapshot(int(sys.argv[1])), f, indent=1)
