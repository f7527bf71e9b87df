"""The markdown table of a re-simulated CPU fidelity run (bench/fidelity_resimulate.py OUT):
    python bench/fidelity_table.py OUT [FILE]      # FILE under OUT, default resimulated.json
One row per load and policy: measured / simulated, the errors as computed (sim / measured - 1; SLO in
points), whether all four are within the bound (10 % / 10 points), and the errors before (the
simulator as it was when measured). Then a summary: the error range per load and the rows that meet
the bound."""

import json
import math
import sys

kBound, kBoundPoints = 0.10, 10.0


def pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * 100:+.1f} %"


def met(r: dict) -> bool:
    rel = [r["mean_latency_error"], r["p99_latency_error"], r["throughput_error"]]
    return (
        all(not math.isnan(x) and abs(x) <= kBound for x in rel)
        and abs(r["slo_points_error"]) <= kBoundPoints
    )


base = sys.argv[1]
rows = json.load(open(f"{base}/{sys.argv[2] if len(sys.argv) > 2 else 'resimulated.json'}"))
print(
    "| load | policy | mean latency meas / sim (s) | error | P99 meas / sim (s) | error "
    "| throughput meas / sim (req/s) | error | SLO meas / sim | points | within | mean / P99 / throughput / SLO error when measured |"
)
print("| ---: | --- | --- | ---: | --- | ---: | --- | ---: | --- | ---: | --- | --- |")
for r in rows:
    m, s, b = r["measured"], r["simulated"], r["before"]
    print(
        f"| {r['load']} | {r['policy']} | {m['mean_latency_s']:.3f} / {s['mean_latency_s']:.3f} | {pct(r['mean_latency_error'])} "
        f"| {m['p99_latency_s']:.3f} / {s['p99_latency_s']:.3f} | {pct(r['p99_latency_error'])} "
        f"| {m['throughput_rps']:.3f} / {s['throughput_rps']:.3f} | {pct(r['throughput_error'])} "
        f"| {m['slo']:.3f} / {s['slo']:.3f} | {r['slo_points_error']:+.1f} | {'yes' if met(r) else 'no'} "
        f"| {pct(b['mean_latency_error'])} / {pct(b['p99_latency_error'])} / {pct(b['throughput_error'])} "
        f"/ {b['slo_points_error']:+.1f} |"
    )
print()
for load in sorted({r["load"] for r in rows}):
    sel = [r for r in rows if r["load"] == load]
    parts = []
    for key, name in [
        ("mean_latency_error", "mean"),
        ("p99_latency_error", "P99"),
        ("throughput_error", "throughput"),
    ]:
        v = [r[key] for r in sel if not math.isnan(r[key])]
        parts.append(f"{name} {pct(min(v))} … {pct(max(v))}")
    v = [r["slo_points_error"] for r in sel]
    parts.append(f"SLO {min(v):+.1f} … {max(v):+.1f} points")
    ok = [r["policy"] for r in sel if met(r)]
    print(f"- load {load}: " + ", ".join(parts) + f"; within the bound: {', '.join(ok) if ok else 'none'}")
