"""The simulator against the server, task by task: where a request's time goes on each side.

A request's latency is its wait before the first task, its tasks' durations (dispatch to reported
done, reshard included), the gaps between one task's end and the next one's dispatch, and (measured
only) what follows its last task (the result's encoding, the HTTP answer, the client). Summing
those per request on both sides shows which one the simulator gets wrong; grouping tasks by kind,
degree, shape and batch size shows for which tasks. The measured side is the server's task log
(Note [Task log] in gfdit.runtime.engine), the simulated side the simulation's trace
(gfdit.sim.TraceEntry), both as the same rows (`sim_task_rows`).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from collections.abc import Sequence

__all__ = [
    "read_task_log",
    "sim_task_rows",
    "align",
    "request_breakdown",
    "compare",
    "render_markdown",
]

kParts = ("wait_s", "tasks_s", "gaps_s", "after_s")


def read_task_log(path: str) -> list[dict]:
    """The rows of a task log (gzip-compressed if the name ends in .gz); a torn last line (a killed
    server) is dropped."""
    rows = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def sim_task_rows(result, requests: Sequence) -> list[dict]:
    """A SimResult's trace as task-log rows (Note [Task log]); a batch is the DENOISE entries that
    share their group, dispatch and end."""
    by_id = {r.request_id: r for r in requests}
    size: dict[tuple, int] = defaultdict(int)
    for e in result.trace:
        if e.task.kind.name == "DENOISE":
            size[(e.ranks, e.start_s, e.end_s)] += 1
    rows = []
    for e in result.trace:
        r = by_id[e.task.request_id]
        rows.append({
            "request_id": r.request_id, "arrival_s": r.arrival_s, "width": r.width, "height": r.height,
            "num_frames": r.num_frames, "kind": e.task.kind.name, "start": e.task.start, "end": e.task.end,
            "ranks": list(e.ranks), "batch_size": size.get((e.ranks, e.start_s, e.end_s), 1),
            "dispatch_s": e.start_s, "end_s": e.end_s, "reshard_s": e.reshard_s,
        })  # fmt: skip
    return rows


kReorderWindowS = 0.05  # two requests sent this close together may reach the server in either order


def align(rows: list[dict], records: Sequence) -> dict[str, str]:
    """The trace's request id of each logged request that replays it. A server answered lone
    calibration requests before the replay: the trace's requests are the last len(records) to
    arrive, in the trace's order, except that two sent within kReorderWindowS of each other may
    arrive swapped: where shapes disagree, a logged request of the right shape arriving within that
    window (at most 3 places later) takes the place; otherwise ValueError."""
    arrivals: dict[str, tuple[float, int, int]] = {}
    for row in rows:
        arrivals.setdefault(row["request_id"], (row["arrival_s"], row["width"], row["height"]))
    logged = sorted(arrivals, key=lambda rid: arrivals[rid][0])[-len(records) :]
    trace = sorted(records, key=lambda r: r.arrival_s)
    if len(logged) < len(trace):
        raise ValueError(f"the task log holds {len(logged)} requests, the trace {len(trace)}")
    out = {}
    for i, rec in enumerate(trace):
        want = (rec.width, rec.height)
        if arrivals[logged[i]][1:] != want:
            j = next(
                (j for j in range(i + 1, min(i + 4, len(logged)))
                 if arrivals[logged[j]][1:] == want
                 and arrivals[logged[j]][0] - arrivals[logged[i]][0] <= kReorderWindowS),
                None,
            )  # fmt: skip
            if j is None:
                rid = logged[i]
                raise ValueError(
                    f"logged request {rid} ({arrivals[rid][1]}x{arrivals[rid][2]}) does not match the trace's "
                    f"{rec.request_id} ({rec.width}x{rec.height}) at the same place in arrival order"
                )
            logged[i], logged[j] = logged[j], logged[i]
        out[logged[i]] = rec.request_id
    return out


def request_breakdown(rows: list[dict], latency_s: dict[str, float] | None = None) -> dict[str, dict]:
    """Per request: wait (first dispatch - arrival), tasks (sum of durations), gaps (sum of dispatch -
    the previous task's end), end (last end - arrival) and, with the end-to-end `latency_s`, after
    (latency - end)."""
    by_req: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_req[row["request_id"]].append(row)
    out = {}
    for rid, tasks in by_req.items():
        tasks.sort(key=lambda t: t["dispatch_s"])
        arrival = tasks[0]["arrival_s"]
        gaps = sum(max(0.0, b["dispatch_s"] - a["end_s"]) for a, b in zip(tasks, tasks[1:], strict=False))
        end = tasks[-1]["end_s"] - arrival
        d = {
            "wait_s": tasks[0]["dispatch_s"] - arrival,
            "tasks_s": sum(t["end_s"] - t["dispatch_s"] for t in tasks),
            "gaps_s": gaps,
            "end_s": end,
            "num_tasks": len(tasks),
        }
        if latency_s is not None and rid in latency_s:
            d["after_s"] = latency_s[rid] - end
        out[rid] = d
    return out


def _task_key(row: dict) -> tuple:
    shape = f"{row['width']}x{row['height']}" + (f"x{row['num_frames']}" if row.get("num_frames") else "")
    return (row["kind"], len(row["ranks"]), shape, row["batch_size"] if row["kind"] == "DENOISE" else 1)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def compare(
    measured: list[dict],
    simulated: list[dict],
    mapping: dict[str, str],
    latency_s: dict[str, float],
    sim_latency_s: dict[str, float] | None = None,
) -> dict:
    """Measured beside simulated: per task group (kind, degree, shape, batch size) the count and mean
    duration (dispatch to done) and reshard seconds; per request the mean of each part of the latency
    (`request_breakdown`), over the requests of the trace (`mapping`: logged id -> trace id;
    `latency_s`: the client's end-to-end latency by trace id; `sim_latency_s`: the simulated one,
    which holds the execution model's result delivery)."""
    measured = [dict(r, request_id=mapping[r["request_id"]]) for r in measured if r["request_id"] in mapping]
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for side, rows in (("measured", measured), ("simulated", simulated)):
        for row in rows:
            g = groups[_task_key(row)]
            g[f"{side}_s"].append(row["end_s"] - row["dispatch_s"])
            g[f"{side}_reshard_s"].append(row["reshard_s"])
    by_task = []
    for key in sorted(groups, key=lambda k: (k[0], k[2], k[1], k[3])):
        g = groups[key]
        by_task.append({
            "kind": key[0], "degree": key[1], "shape": key[2], "batch_size": key[3],
            "measured_count": len(g["measured_s"]), "simulated_count": len(g["simulated_s"]),
            "measured_mean_s": _mean(g["measured_s"]), "simulated_mean_s": _mean(g["simulated_s"]),
            "measured_reshard_s": _mean(g["measured_reshard_s"]), "simulated_reshard_s": _mean(g["simulated_reshard_s"]),
        })  # fmt: skip
    parts = {}
    for side, rows, lat in (("measured", measured, latency_s), ("simulated", simulated, sim_latency_s)):
        b = request_breakdown(rows, lat)
        parts[side] = {p: _mean([d[p] for d in b.values() if p in d]) for p in (*kParts, "end_s")}
        parts[side]["num_tasks"] = _mean([d["num_tasks"] for d in b.values()])
        parts[side]["requests"] = len(b)
    return {"by_task": by_task, "by_request": parts}


def _ms(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.1f}"


def render_markdown(report: dict, title: str) -> str:
    """One policy's comparison as markdown."""
    m, s = report["by_request"]["measured"], report["by_request"]["simulated"]
    lines = [
        f"## {title}",
        "",
        "Mean per request (ms): wait before the first task, the tasks' durations, the gaps between tasks, "
        "the last task's end, and what follows it (the latency at the client minus that end).",
        "",
        "| | requests | tasks | wait | tasks | gaps | last end | after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, d in (("measured", m), ("simulated", s)):
        lines.append(
            f"| {name} | {d['requests']} | {d['num_tasks']:.1f} | {_ms(d['wait_s'])} | {_ms(d['tasks_s'])} | "
            f"{_ms(d['gaps_s'])} | {_ms(d['end_s'])} | {_ms(d['after_s'])} |"
        )
    lines += [
        "",
        "Tasks by kind, degree, shape and batch size: count and mean duration (dispatch to done, ms).",
        "",
        "| kind | degree | shape | batch | count meas / sim | mean meas / sim | sim / meas | reshard meas / sim |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | --- |",
    ]
    for t in report["by_task"]:
        ratio = (
            t["simulated_mean_s"] / t["measured_mean_s"]
            if t["measured_count"] and t["simulated_count"]
            else math.nan
        )
        lines.append(
            f"| {t['kind']} | {t['degree']} | {t['shape']} | {t['batch_size']} | {t['measured_count']} / "
            f"{t['simulated_count']} | {_ms(t['measured_mean_s'])} / {_ms(t['simulated_mean_s'])} | "
            f"{'–' if math.isnan(ratio) else f'{ratio:.2f}'} | {_ms(t['measured_reshard_s'])} / "
            f"{_ms(t['simulated_reshard_s'])} |"
        )
    return "\n".join(lines) + "\n"
