"""How far the measurement itself moves between fidelity runs of the same traces on fresh servers: for
each load and policy, the measured mean latency, SLO attainment and throughput of every run, and the
largest over the smallest mean latency. Writes markdown to stdout:
    python bench/fidelity_compare_runs.py RUN_DIR RUN_DIR [...]     (each holds load*/fidelity.json)
Runs whose traces differ are refused (the trace files' SHA-256 must match per load).
"""

import glob
import hashlib
import json
import os
import sys


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(dirs: list[str]) -> None:
    loads = sorted(
        {
            os.path.basename(os.path.dirname(p))[4:]
            for p in glob.glob(os.path.join(dirs[0], "load*", "fidelity.json"))
        }
    )
    print(
        "| load | policy | mean latency (s), per run | largest / smallest | SLO per run | throughput (req/s) per run |"
    )
    print("| ---: | --- | --- | ---: | --- | --- |")
    for load in loads:
        traces = {digest(os.path.join(d, f"trace-load{load}.jsonl")) for d in dirs}
        if len(traces) != 1:
            sys.exit(f"load {load}: the runs replayed different traces")
        runs = [
            {
                r["policy"]: r["measured"]
                for r in json.load(open(os.path.join(d, f"load{load}", "fidelity.json")))["runs"]
            }
            for d in dirs
        ]
        for policy in runs[0]:
            ms = [r[policy] for r in runs if policy in r]
            lat = [m["mean_latency_s"] for m in ms]
            slo = " / ".join(f"{m['slo']:.2f}" for m in ms)
            thr = " / ".join(f"{m['throughput_rps']:.2f}" for m in ms)
            print(
                f"| {load} | {policy} | {' / '.join(f'{x:.3f}' for x in lat)} | {max(lat) / min(lat):.2f} "
                f"| {slo} | {thr} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
