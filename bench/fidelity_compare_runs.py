"""How far the measurement itself moves between fidelity runs of the same traces on fresh servers: for
each load and policy, the measured mean latency, SLO attainment and throughput of every run, and the
largest over the smallest mean latency. Writes markdown to stdout:
    python bench/fidelity_compare_runs.py RUN_DIR RUN_DIR [...] [--sim RUN_DIR]
(each holds load*/fidelity.json). Runs whose traces differ are refused (the trace files' SHA-256 must
match per load). With --sim, a last column says whether that run's simulation lies within the range
the runs measured: mean latency in [0.9 x the smallest, 1.1 x the largest], SLO within 10 points of
the measured range; and a count per load.
"""

import glob
import hashlib
import json
import os
import sys


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(dirs: list[str], sim: str | None) -> None:
    loads = sorted(
        {
            os.path.basename(os.path.dirname(p))[4:]
            for p in glob.glob(os.path.join(dirs[0], "load*", "fidelity.json"))
        }
    )
    head = "| load | policy | mean latency (s), per run | largest / smallest | SLO per run | throughput (req/s) per run |"
    print(head + (" simulation in range |" if sim else ""))
    print("| ---: | --- | --- | ---: | --- | --- |" + (" --- |" if sim else ""))
    counts = []
    for load in loads:
        traces = {digest(os.path.join(d, f"trace-load{load}.jsonl")) for d in dirs}
        if len(traces) != 1:
            sys.exit(f"load {load}: the runs replayed different traces")
        simulated = {}
        if sim:
            simulated = {
                r["policy"]: r["simulated"]
                for r in json.load(open(os.path.join(sim, f"load{load}", "fidelity.json")))["runs"]
            }
        inside = 0
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
            cell = ""
            if policy in simulated:
                s, levels = simulated[policy], [m["slo"] for m in ms]
                ok = (
                    0.9 * min(lat) <= s["mean_latency_s"] <= 1.1 * max(lat)
                    and min(levels) - 0.1 <= s["slo"] <= max(levels) + 0.1
                )
                inside += ok
                cell = f" {'yes' if ok else 'no'} ({s['mean_latency_s']:.3f} s, {s['slo']:.2f}) |"
            print(
                f"| {load} | {policy} | {' / '.join(f'{x:.3f}' for x in lat)} | {max(lat) / min(lat):.2f} "
                f"| {slo} | {thr} |{cell}"
            )
        counts.append((load, inside, len(runs[0])))
    if sim:
        print()
        for load, inside, n in counts:
            print(f"- load {load}: the simulation within the measured range in {inside} of {n} rows")


if __name__ == "__main__":
    argv = sys.argv[1:]
    sim_dir = None
    if "--sim" in argv:
        i = argv.index("--sim")
        sim_dir = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    main(argv, sim_dir)
