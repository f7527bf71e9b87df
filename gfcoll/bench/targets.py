"""gfcoll-bench runs side by side, and the targets checked against them.

    python -m gfcoll.bench.targets RUN.json [RUN.json ...] --out targets.md [--json targets.json]

Each RUN.json is one gfcoll-bench run (schema gfcoll-bench/1) with the torch.distributed baseline,
on CUDA: one per gfcoll transport (``GFCOLL_TRANSPORT=ipc`` or ``nccl``, recorded in the run's
environment) and per timing (eager or graph replay). A run's ratios come from the baseline of the
same run (same process, same moment); the side-by-side table puts the runs of one world size, timing,
collective, group and size on one line.

Targets (each checked per run, collective and group, and reported met or missed with the rows that
miss it):
- latency: at sizes up to 256 KiB, gfcoll's time <= 0.5 x the baseline's (all_gather, all_to_all,
  all_reduce);
- bandwidth: at 16 MiB and above, gfcoll's bus bandwidth >= 0.95 x the baseline's (every collective);
- all_reduce at 256 MiB: >= 1.0 x the baseline's bus bandwidth;
- first use: the first operation on a never-used group <= 1.1 x the steady state (the run's
  gfcoll.first_op and gfcoll.steady_op rows: the set's first use, and the median over new orders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .report import first_op_ratios, fmt_bytes, fmt_time

kSmall = 256 << 10  # latency target: sizes up to this
kLarge = 16 << 20  # bandwidth target: sizes from this
kLatencyOps = ("all_gather", "all_to_all", "all_reduce")
kLatencyMax = 0.5  # gfcoll time / baseline time
kBandwidthMin = 0.95  # gfcoll busbw / baseline busbw
kAllReduceBytes = 256 << 20
kAllReduceMin = 1.0
kFirstOpMax = 1.1


@dataclass(frozen=True)
class Run:
    path: str
    world: int
    transport: str  # gfcoll's transport for CUDA operations: ipc, nccl or auto
    timing: str  # "graph replay", "back-to-back" or "per-op"
    doc: dict

    @property
    def label(self) -> str:
        return f"gfcoll-{self.transport}"


def load(path: str) -> Run:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != "gfcoll-bench/1":
        raise ValueError(f"{path}: not a gfcoll-bench result (schema {doc.get('schema')!r})")
    env, opts = doc["environment"], doc["options"]
    timing = "graph replay" if opts.get("graph") else opts.get("timing", "per-op")
    return Run(path, int(env["world_size"]), env.get("gfcoll_transport_forced", "auto"), timing, doc)


def _ratio(row: dict) -> float | None:
    """gfcoll time / baseline time (< 1: gfcoll faster), None where either is missing."""
    g, b = row["gfcoll"], row.get("baseline")
    if not b or not g.get("time_us") or not b.get("time_us"):
        return None
    return g["time_us"] / b["time_us"]


def check(run: Run) -> list[dict]:
    """Every target of one run: dicts with target, op, group, met (True/False/None: no rows), the
    rows missing it and the worst value."""
    out = []
    rows = run.doc["rows"]
    groups = list(dict.fromkeys((r["op"], tuple(r["group"])) for r in rows))

    def add(target: str, op: str, group, values: list[tuple[int, float | None]], ok, worst) -> None:
        have = [(n, v) for n, v in values if v is not None]
        missing = [n for n, v in values if v is None]
        misses = [(n, v) for n, v in have if not ok(v)]
        out.append({
            "run": run.path, "world": run.world, "transport": run.transport, "timing": run.timing,
            "target": target, "op": op, "group": list(group) if group else None,
            "met": (not misses and not missing) if have or missing else None,
            "rows": len(values), "misses": [fmt_bytes(n) for n, _ in misses] + [f"{fmt_bytes(n)} (no time)" for n in missing],
            "worst": worst([v for _, v in have]) if have else None,
        })  # fmt: skip

    if not run.doc["options"].get("baseline", True):
        groups = []  # no baseline in this run: only the first-use target applies
    for op, group in groups:
        mine = [r for r in rows if r["op"] == op and tuple(r["group"]) == group]
        if op in kLatencyOps:
            small = [(r["bytes"], _ratio(r)) for r in mine if r["bytes"] <= kSmall]
            if small:
                add("latency <= 0.5x", op, group, small, lambda v: v <= kLatencyMax, max)
        large = [(r["bytes"], _inverse(_ratio(r))) for r in mine if r["bytes"] >= kLarge]
        if large:
            add("busbw >= 0.95x", op, group, large, lambda v: v >= kBandwidthMin, min)
        if op == "all_reduce":
            top = [(r["bytes"], _inverse(_ratio(r))) for r in mine if r["requested_bytes"] == kAllReduceBytes]
            if top:
                add("all_reduce 256 MiB >= 1.0x", op, group, top, lambda v: v >= kAllReduceMin, min)
    for q in first_op_ratios(run.doc.get("formation", [])):
        for key in ("first_ratio", "median_ratio"):
            which = "set's first use" if key == "first_ratio" else "median of new orders"
            add(f"first op <= 1.1x steady ({which})", "all_reduce", q["group"], [(4, q[key])],
                lambda v: v <= kFirstOpMax, max)  # fmt: skip
    return out


def _inverse(v: float | None) -> float | None:
    return 1.0 / v if v else None


def side_by_side(runs: Sequence[Run]) -> list[str]:
    """Markdown: per (world, timing), one table per collective, a line per (group, size): each
    run's gfcoll time and its baseline's."""
    lines = []
    for world, timing in dict.fromkeys((r.world, r.timing) for r in runs):
        same = [r for r in runs if (r.world, r.timing) == (world, timing)]
        ops = list(dict.fromkeys(row["op"] for r in same for row in r.doc["rows"]))
        lines += [f"## {world} ranks, {timing}", ""]
        for op in ops:
            head = "| group | size | " + " | ".join(
                f"{r.label} (us) | NCCL beside it (us) | {r.label} / NCCL" for r in same
            )
            lines += [f"### {op}", "", head + " |", "| --- | ---: |" + " ---: | ---: | ---: |" * len(same)]
            keys = list(dict.fromkeys(
                (tuple(row["group"]), row["bytes"]) for r in same for row in r.doc["rows"] if row["op"] == op
            ))  # fmt: skip
            index = [
                {(tuple(x["group"]), x["bytes"]): x for x in r.doc["rows"] if x["op"] == op} for r in same
            ]
            for key in keys:
                cells = [str(list(key[0])), fmt_bytes(key[1])]
                for table in index:
                    row = table.get(key)
                    g = row and row["gfcoll"].get("time_us")
                    b = row and (row.get("baseline") or {}).get("time_us")
                    ratio = _ratio(row) if row else None
                    cells += [_num(g), _num(b), _num(ratio, 3)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _num(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render(runs: Sequence[Run], results: list[dict]) -> str:
    lines = ["# gfcoll targets", ""]
    for r in runs:
        env = r.doc["environment"]
        lines.append(
            f"- `{r.path}`: {r.world} ranks, {r.label}, {r.timing}; cards {', '.join(env.get('cards', []))}; "
            f"commit {env.get('git_commit')}; {env.get('date')}; `{env.get('command')}`"
        )
    lines += ["", "## Targets", "", "| ranks | transport | timing | target | op | group | met | worst | missed at |",
              "| ---: | --- | --- | --- | --- | --- | --- | ---: | --- |"]  # fmt: skip
    for t in results:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(
            f"| {t['world']} | {t['transport']} | {t['timing']} | {t['target']} | {t['op']} | {t['group']} | {met} "
            f"| {_num(t['worst'], 3)} | {', '.join(t['misses'])} |"
        )
    met = sum(1 for t in results if t["met"])
    lines += ["", f"{met} of {len(results)} checks met (worst: the gfcoll/baseline time ratio for "
              "latency and first use, the busbw ratio for bandwidth).", ""]  # fmt: skip
    for r in runs:
        for q in first_op_ratios(r.doc.get("formation", [])):
            lines.append(
                f"- {r.world} ranks {r.label}, group {q['group']}: first operation {fmt_time(q['first_us'])}, "
                f"steady {fmt_time(q['steady_us'])}"
            )
    lines += ["", *side_by_side(runs)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gfcoll.bench.targets", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="gfcoll-bench JSON files (--json) of CUDA runs with the baseline")
    p.add_argument("--out", required=True, help="markdown report")
    p.add_argument("--json", help="also write the checks as JSON")
    args = p.parse_args(argv)
    try:
        runs = [load(path) for path in args.runs]
    except (OSError, ValueError, KeyError) as e:
        print(f"gfcoll.bench.targets: {e}", file=sys.stderr)
        return 2
    results = [t for r in runs for t in check(r)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(runs, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{sum(1 for t in results if t['met'])} of {len(results)} checks met; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
