"""One-rank denoising steps under the server against the isolated sharing curve, from a CPU fidelity
run's task logs: for every one-rank, unbatched DENOISE chunk of >= 5 steps, its time per step over the
profiled one-rank step (its slowdown), against the time-averaged number of ranks busy while it ran
(from every task in the same log, a batch's members counted once each), binned to 0.5. Beside it the
same from the simulation's rows (sim-tasks.jsonl.gz, where the run kept them) and the isolated curve
s(k) of concurrency.json. Writes markdown to stdout:
    python bench/fidelity_sharing_check.py RUN_DIR LOAD POLICY_FOLDER [...]
"""

import bisect
import json
import os
import sys
from collections import defaultdict

from gfdit.bench.workload import read_trace
from gfdit.eval.tasks import align, read_task_log


def first(paths):
    return next((p for p in paths if os.path.exists(p)), None)


def slowdowns(rows: list[dict], step_s: dict[int, float]) -> dict[float, list[float]]:
    events = sorted(
        (t, d) for r in rows for t, d in ((r["dispatch_s"], len(r["ranks"])), (r["end_s"], -len(r["ranks"])))
    )
    times, level, count = [], [], 0
    for t, d in events:
        count += d
        times.append(t)
        level.append(count)

    def busy(a: float, b: float) -> float:
        i = bisect.bisect_right(times, a) - 1
        c, t, total = (level[i] if i >= 0 else 0), a, 0.0
        for j in range(i + 1, len(times)):
            if times[j] >= b:
                break
            total += c * (times[j] - t)
            t, c = times[j], level[j]
        return (total + c * (b - t)) / (b - a)

    bins: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        steps = r["end"] - r["start"]
        if r["kind"] == "DENOISE" and len(r["ranks"]) == 1 and r["batch_size"] == 1 and steps >= 5:
            k = busy(r["dispatch_s"], r["end_s"])
            bins[round(k * 2) / 2].append((r["end_s"] - r["dispatch_s"]) / steps / step_s[r["width"]])
    return bins


def main(run: str, load: str, folders: list[str]) -> None:
    profile = json.load(open(os.path.join(run, "tiny-flux-cpu4.json")))
    per = defaultdict(list)
    for o in profile["observations"]:
        if o["kind"] == "DENOISE" and o["degree"] == 1 and o.get("batch_size", 1) == 1:
            per[o["width"]].append(o["seconds"])
    step_s = {w: sorted(v)[len(v) // 2] for w, v in per.items()}
    curve = json.load(open(os.path.join(run, "concurrency.json")))["rows"]
    iso = defaultdict(list)
    for row in curve:
        iso[row["procs"]].append(row["ratio"])
    _, records = read_trace(os.path.join(run, f"trace-load{load}.jsonl"))
    print("| policy | side | slowdown by busy ranks (k: mean over chunks, count) |")
    print("| --- | --- | --- |")
    print(
        f"| (isolated) | concurrency.json | {' '.join(f'k={k}: {sum(v) / len(v):.2f}' for k, v in sorted(iso.items()))} |"
    )
    for folder in folders:
        d = os.path.join(run, f"load{load}", folder)
        measured = read_task_log(first([os.path.join(d, "tasks.jsonl.gz"), os.path.join(d, "tasks.jsonl")]))
        replayed = set(align(measured, records))
        sides = [("measured", [r for r in measured if r["request_id"] in replayed])]
        sim = first([os.path.join(d, "sim-tasks.jsonl.gz"), os.path.join(d, "sim-tasks.jsonl")])
        if sim:
            sides.append(("simulated", read_task_log(sim)))
        for side, rows in sides:
            bins = slowdowns(rows, step_s)
            cells = " ".join(
                f"k={k}: {sum(v) / len(v):.2f} ({len(v)})" for k, v in sorted(bins.items()) if k <= 4.5
            )
            print(f"| {folder} | {side} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
