"""Serving at load against the baselines: the measured (and simulated) figures of every policy and
load that `bench/multigpu.sh fidelity` ran, and the serving targets checked on them.

    python bench/serving_targets.py FID_DIR --out serving.md [--json serving.json]

FID_DIR holds one folder per trace, MODEL-MIX-LOAD, each with one folder per policy role made by
`gfdit eval fidelity` (fidelity.json): k1-fixed (the fixed pipeline, static SP over every GPU),
k2-best-static (the best static configuration gfdit tune found on the trace), k3-tetriserve and
k4-best-elastic (the best elastic policy gfdit tune found). Other folders (a policy spec given
instead of a role) are listed but take no part in the targets.

Targets, per MODEL-MIX:
- goodput (the highest measured throughput among the loads whose SLO attainment is >= 90 %) of the
  best elastic policy >= 6x the fixed pipeline's;
- SLO attainment at load 0.8: best elastic >= 1.3x the best static configuration's;
- simulator error <= 10 % on mean latency and P99, <= 10 points on SLO attainment, every row.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

kRoles = {"k1-fixed": "fixed pipeline", "k2-best-static": "best static", "k3-tetriserve": "tetriserve",
          "k4-best-elastic": "best elastic"}  # fmt: skip
kGoodputSlo = 0.9
kGoodputRatio = 6.0
kSloRatio = 1.3
kSloLoad = 0.8
kSimBound, kSimPoints = 0.10, 10.0


def collect(root: str) -> list[dict]:
    """One row per (trace, policy folder) with a fidelity.json."""
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "fidelity.json"))):
        policy_dir = os.path.basename(os.path.dirname(path))
        trace_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
        m = re.fullmatch(r"(.+)-([a-z]+-[a-z]+)-([0-9.]+)", trace_dir)
        if not m:
            continue
        with open(path) as f:
            doc = json.load(f)
        for run in doc["runs"]:
            rows.append({
                "model": m.group(1), "mix": m.group(2), "load": float(m.group(3)), "role": kRoles.get(policy_dir),
                "folder": policy_dir, "policy": run["policy"], "world_size": run.get("world_size"),
                "measured": run["measured"], "simulated": run["simulated"],
                "errors": {k: run.get(k) for k in ("mean_latency_error", "p99_latency_error", "throughput_error",
                                                    "slo_points_error")},
            })  # fmt: skip
    return rows


def goodput(rows: list[dict]) -> float | None:
    ok = [r["measured"]["throughput_rps"] for r in rows if r["measured"]["slo"] >= kGoodputSlo]
    return max(ok) if ok else None


def check(rows: list[dict]) -> list[dict]:
    out = []
    for model, mix in dict.fromkeys((r["model"], r["mix"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["mix"]) == (model, mix)]

        def role(name, mine=mine):
            return [r for r in mine if r["role"] == name]

        g_el, g_fix = goodput(role("best elastic")), goodput(role("fixed pipeline"))
        ratio = g_el / g_fix if g_el and g_fix else None
        out.append({"model": model, "mix": mix, "target": f"goodput >= {kGoodputRatio}x the fixed pipeline",
                    "value": ratio, "met": None if ratio is None else ratio >= kGoodputRatio,
                    "detail": f"best elastic {_f(g_el)} req/s, fixed pipeline {_f(g_fix)} req/s (SLO >= 90 %)"})  # fmt: skip
        el = [r for r in role("best elastic") if r["load"] == kSloLoad]
        st = [r for r in role("best static") if r["load"] == kSloLoad]
        slo_ratio = None
        if el and st and st[0]["measured"]["slo"] > 0:
            slo_ratio = el[0]["measured"]["slo"] / st[0]["measured"]["slo"]
        out.append({"model": model, "mix": mix, "target": f"SLO at load {kSloLoad} >= {kSloRatio}x the best static",
                    "value": slo_ratio, "met": None if slo_ratio is None else slo_ratio >= kSloRatio,
                    "detail": f"best elastic {_pct(el[0]['measured']['slo']) if el else 'n/a'}, "
                              f"best static {_pct(st[0]['measured']['slo']) if st else 'n/a'}"})  # fmt: skip
        within = [_within(r) for r in mine]
        out.append({"model": model, "mix": mix, "target": "simulator within 10 % (mean, P99) and 10 points (SLO)",
                    "value": sum(within), "met": all(within) if within else None,
                    "detail": f"{sum(within)} of {len(within)} rows"})  # fmt: skip
    return out


def _within(r: dict) -> bool:
    e = r["errors"]
    rel = [e["mean_latency_error"], e["p99_latency_error"]]
    return (
        all(x is not None and abs(x) <= kSimBound for x in rel) and abs(e["slo_points_error"]) <= kSimPoints
    )


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.1f} %"


def _err(v) -> str:
    return "n/a" if v is None else f"{v * 100:+.1f} %"


def render(rows: list[dict], checks: list[dict]) -> str:
    lines = ["# Serving at load against the baselines (measured, simulated beside)", "",
             "| model | mix | load | role | policy | throughput (req/s) | mean (s) | P99 (s) | SLO | sim mean err "
             "| sim P99 err | sim SLO err (points) |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: |"]  # fmt: skip
    order = {name: k for k, name in enumerate(kRoles.values())}
    for r in sorted(
        rows, key=lambda r: (r["model"], r["mix"], r["load"], order.get(r["role"], 9), r["folder"])
    ):
        m, e = r["measured"], r["errors"]
        lines.append(
            f"| {r['model']} | {r['mix']} | {r['load']} | {r['role'] or r['folder']} | `{r['policy']}` "
            f"| {m['throughput_rps']:.3f} | {m['mean_latency_s']:.2f} | {m['p99_latency_s']:.2f} | {_pct(m['slo'])} "
            f"| {_err(e['mean_latency_error'])} | {_err(e['p99_latency_error'])} | {e['slo_points_error']:+.1f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| model | mix | target | value | met | detail |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for c in checks:
        met = {True: "yes", False: "**no**", None: "n/a (not measured)"}[c["met"]]
        lines.append(
            f"| {c['model']} | {c['mix']} | {c['target']} | {_f(c['value'])} | {met} | {c['detail']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="the fid folder of bench/multigpu.sh")
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        print(f"no fidelity.json under {args.root}/*/*/", file=sys.stderr)
        return 2
    checks = check(rows)
    with open(args.out, "w") as f:
        f.write(render(rows, checks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "targets": checks}, f, indent=1)
    print(f"{len(rows)} rows; {sum(1 for c in checks if c['met'])} of {len(checks)} targets met; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
