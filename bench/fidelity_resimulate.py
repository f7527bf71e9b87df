"""Re-simulates a saved CPU fidelity run (bench/fidelity_cpu.sh OUT) with the current simulator and
writes OUT/resimulated.json: the saved measurements beside the new simulation, and the errors before.
    python bench/fidelity_resimulate.py OUT
"""

import json
import sys
from dataclasses import replace

from gfdit.bench.workload import read_trace
from gfdit.cost import read_profile
from gfdit.eval.fidelity import errors, simulated_metrics
from gfdit.simexec import ExecutionModel

base = sys.argv[1]
prof = read_profile(f"{base}/tiny-flux-cpu4.json", model="tiny-flux")
out = []
for load in ["0.5", "0.8", "1.0"]:
    d = json.load(open(f"{base}/load{load}/fidelity.json"))
    _, records = read_trace(f"{base}/trace-load{load}.jsonl")
    ex0 = ExecutionModel(**d["execution"])
    for r in d["runs"]:
        ex = replace(ex0, host_overhead_s=r["host_overhead_s"])
        sim = simulated_metrics(
            records,
            r["policy"],
            r["world_size"],
            chunk_steps=d["chunk_steps"],
            cost_profile=prof,
            execution=ex,
        )
        e = errors(r["measured"], sim)
        out.append(
            {
                "load": load,
                "policy": r["policy"],
                "measured": r["measured"],
                "simulated": sim,
                **e,
                "before": {
                    k: r[k]
                    for k in (
                        "mean_latency_error",
                        "p99_latency_error",
                        "throughput_error",
                        "slo_points_error",
                    )
                },
            }
        )
        print(
            load,
            r["policy"],
            {k: round(v, 3) for k, v in e.items()},
            "before",
            round(r["mean_latency_error"], 3),
            round(r["throughput_error"], 3),
        )
json.dump(out, open(f"{base}/resimulated.json", "w"), indent=1)
