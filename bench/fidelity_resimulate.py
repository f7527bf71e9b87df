"""Re-simulates a saved CPU fidelity run (bench/fidelity_cpu.sh OUT) with the current simulator and
writes OUT/resimulated.json: the saved measurements beside the new simulation, and the errors before.
    python bench/fidelity_resimulate.py OUT [--sharing FILE] [--no-scale] [--no-host-cpu] [--no-result]
                                            [--host-window-s S] [--host-cpu-factor F] [--json NAME]

The execution model is the saved one (fidelity.json's "execution") with what each policy's idle
server measured, calibrated again under the current model in the order gfdit eval fidelity uses:
the result delivery (where the run saved the lone requests' figures), the compute scale from the lone-request latencies (gfdit.eval.fidelity.calibrated_scale), the
per-request host CPU (run["host_cpu"] less the scaled compute, Note [Simulated execution] in
gfdit.simexec), then the per-task host overhead (calibrated_overhead). A run saved before the
host CPU was measured takes the same policy's measurement from another load of OUT (named in
"host_cpu_from"), or none.
"""

import argparse
import json
import math
import os
from dataclasses import replace

from gfdit.bench.workload import RequestClass, read_trace
from gfdit.cost import read_profile
from gfdit.eval import tasks
from gfdit.eval.cli import sharing_points
from gfdit.eval.fidelity import (
    calibrated_overhead,
    calibrated_result_s,
    calibrated_scale,
    errors,
    host_cpu_table,
    lone_task_fit,
    simulated_metrics,
)
from gfdit.simexec import ExecutionModel

kLoads = ["0.5", "0.8", "1.0"]
kErrorKeys = ("mean_latency_error", "p99_latency_error", "throughput_error", "slo_points_error")

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--host-window-s", type=float, default=None, help="override ExecutionModel.host_window_s")
ap.add_argument(
    "--sharing", default=None,
    help="bench/fidelity_concurrency.py's JSON: the measured slowdown of k processes (default: the saved model's)",
)  # fmt: skip
ap.add_argument(
    "--no-scale", action="store_true",
    help="leave ExecutionModel.compute_scale at 1 (no calibration of the compute from the lone requests)",
)  # fmt: skip
ap.add_argument("--no-host-cpu", action="store_true", help="leave the host CPU out (the model before it)")
ap.add_argument(
    "--no-result", action="store_true",
    help="leave the result delivery out (ExecutionModel.result_s; calibrated from the idle server's lone "
    "requests, calibration_after_s, where the run saved them)",
)  # fmt: skip
ap.add_argument(
    "--host-cpu-factor", type=float, default=1.0,
    help="multiply the per-request host CPU measured on the idle server (a sensitivity variant: the host "
    "work per request under load, e.g. from bench/fidelity_threads.py, over the lone one)",
)  # fmt: skip
ap.add_argument("--json", default="resimulated.json", help="file name under OUT")
ap.add_argument("--profile", default=None, help="the run's cost profile (default OUT/tiny-flux-cpu4.json)")
ap.add_argument(
    "--no-task-fit", action="store_true",
    help="calibrate the compute scale and the per-task overhead from the lone latencies, not from the lone "
    "requests' tasks in the task log (gfdit.eval.fidelity.lone_task_fit)",
)  # fmt: skip
args = ap.parse_args()
base = args.out
prof = read_profile(args.profile or f"{base}/tiny-flux-cpu4.json", model="tiny-flux")
reports = {}
for load in kLoads:
    try:
        reports[load] = json.load(open(f"{base}/load{load}/fidelity.json"))
    except FileNotFoundError:
        print(f"load {load}: no fidelity.json, skipped")
measured_cpu = {}  # policy -> (load, host_cpu) of the first load that measured it
for load, d in reports.items():
    for r in d["runs"]:
        if r.get("host_cpu") is not None:
            measured_cpu.setdefault(r["policy"], (load, r["host_cpu"]))
out = []
for load, d in reports.items():
    meta, records = read_trace(f"{base}/trace-load{load}.jsonl")
    classes = [
        RequestClass(
            c["name"], c["width"], c["height"], c["num_frames"], c["num_inference_steps"], c["weight"]
        )
        for c in meta["spec"]["classes"]
    ]
    ex0 = ExecutionModel(**d["execution"])
    if args.sharing is not None:
        ex0 = replace(ex0, sharing=sharing_points(args.sharing))
    if args.host_window_s is not None:
        ex0 = replace(ex0, host_window_s=args.host_window_s)
    for r in d["runs"]:
        policy, world, chunk = r["policy"], r["world_size"], d["chunk_steps"]
        ex, cpu_from, host_cpu = ex0, None, None
        if r.get("host_cpu") is not None:
            cpu_from, host_cpu = load, r["host_cpu"]
        elif policy in measured_cpu:
            cpu_from, host_cpu = measured_cpu[policy]
        if not args.no_result and r.get("calibration_after_s"):  # first: the lone latency holds it
            ex = replace(ex, result_s=calibrated_result_s(r["calibration_after_s"]))
        label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in policy)  # the run's folder
        logs = [f"{base}/load{load}/{label}/tasks.jsonl{z}" for z in (".gz", "")]
        log_path = next((p for p in logs if os.path.exists(p)), None)
        fit = None
        if log_path is not None and not args.no_task_fit and not args.no_scale:
            rows = tasks.read_task_log(log_path)
            try:
                replayed = set(tasks.align(rows, records))
            except ValueError as e:  # as gfdit eval fidelity does: no task log then
                print(f"{load} {policy}: {e}; calibrated from the lone latencies")
                replayed = None
            if replayed is not None:
                fit = lone_task_fit(rows, replayed, policy, world, "tiny-flux", classes,
                                    chunk_steps=chunk, cost_profile=prof, execution=ex)  # fmt: skip
        if fit is not None:
            ex = replace(ex, compute_scale=fit[0], host_overhead_s=fit[1])
        elif not args.no_scale:  # then: the host CPU is what the scaled compute leaves
            scale = calibrated_scale(policy, world, "tiny-flux", classes, r["calibrated_standalone_s"],
                                     chunk_steps=chunk, cost_profile=prof, execution=ex)  # fmt: skip
            ex = replace(ex, compute_scale=scale)
        if host_cpu is not None and not args.no_host_cpu and ex.cores > 0:
            table = host_cpu_table(host_cpu, policy, world, "tiny-flux", classes,
                                   chunk_steps=chunk, cost_profile=prof, execution=ex)  # fmt: skip
            if args.host_cpu_factor != 1.0:
                table = tuple((w, h, s * args.host_cpu_factor) for w, h, s in table)
            ex = replace(ex, host_cpu_by_size=table)
        if fit is None:
            overhead = calibrated_overhead(policy, world, "tiny-flux", classes, r["calibrated_standalone_s"],
                                           chunk_steps=chunk, cost_profile=prof, execution=ex)  # fmt: skip
            ex = replace(ex, host_overhead_s=overhead)
        sim = simulated_metrics(records, policy, world, chunk_steps=chunk, cost_profile=prof, execution=ex)
        e = errors(r["measured"], sim)
        out.append(
            {
                "load": load,
                "policy": policy,
                "measured": r["measured"],
                "simulated": sim,
                **e,
                "execution": ex.to_json(),
                "host_cpu_from": cpu_from,
                "before": {k: r[k] for k in kErrorKeys},
            }
        )
        ok = all(abs(e[k]) <= 0.10 for k in kErrorKeys[:3]) and abs(e["slo_points_error"]) <= 10
        print(
            load,
            f"{policy:14s}",
            " ".join(
                f"{k.split('_')[0]} {100 * v:+6.1f}" if k != "slo_points_error" else f"slo {v:+6.1f}"
                for k, v in e.items()
            ),  # fmt: skip
            "| met" if ok else "| missed",
            "| host CPU/req",
            [round(s, 4) for _, _, s in ex.host_cpu_by_size],
            f"overhead {ex.host_overhead_s * 1e3:.2f} ms, result {ex.result_s * 1e3:.1f} ms",
            f"(before: mean {100 * r['mean_latency_error']:+.1f} thr {100 * r['throughput_error']:+.1f})"
            if not math.isnan(r["mean_latency_error"])
            else "",
        )
json.dump(out, open(f"{base}/{args.json}", "w"), indent=1)
