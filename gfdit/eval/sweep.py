"""`gfdit eval sweep`: the simulator over target load x policy x seed on a named mix, with the
paper's metrics, as JSON, markdown and PNG plots.

For each load rho and seed, one trace is generated from the mix at the mean rate that offers rho to
the world (gfdit.bench.workload.rate_for_load) with about `num_requests` requests; every policy then
runs that same trace through the server's Scheduler in the simulator (gfdit.sim), with the execution
model of Note [Simulated execution]. Metrics per run:

  throughput_rps       completed requests / (last event - first arrival)
  mean / p99 latency   of completed requests (arrival to result)
  slo                  fraction of requests that met their deadline (overall and per class)
  gpu_s                rank-seconds of tasks (sum over tasks of duration x group size)
  preemptions          Scheduler.num_preemptions (a request's ranks went to another at a boundary)
  reshards, reshard_bytes  tasks that moved state first, and the bytes they moved

Per policy, "goodput" is the largest load whose mean SLO attainment (over seeds) is >= 90 %, and
`goodput_rps` the mean throughput there (the paper's "throughput at >= 90 % SLO attainment").
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gfdit.bench.mixes import mix_classes
from gfdit.bench.workload import (
    Phase,
    WorkloadSpec,
    analytic_standalone,
    generate,
    offered_load,
    rate_for_load,
)
from gfdit.cost import AnalyticCostModel, get_profile
from gfdit.policy import make_policy
from gfdit.request import RequestState
from gfdit.scheduler import Scheduler
from gfdit.sim import simulate
from gfdit.simexec import ExecutionModel

__all__ = [
    "SweepConfig",
    "run_sweep",
    "summarize",
    "render_markdown",
    "write_sweep",
    "degree_check",
    "render_degree_check",
    "kSloTarget",
]

kSloTarget = 0.9  # SLO attainment at which throughput counts as goodput
kStaticNames = ("static", "rssp")  # static-parallelism baselines


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs."""

    model: str  # model preset
    world_size: int  # simulated ranks
    mix: str  # named mix (gfdit.bench.mixes)
    loads: tuple[float, ...]  # target loads rho
    policies: tuple[str, ...]  # policy specs
    seeds: int = 1  # traces per load (seeds 0..seeds-1)
    num_requests: int = 200  # requests per trace (about: arrivals are random)
    chunk_steps: int = 2  # the scheduler's chunk_steps
    cost_profile: dict | None = None  # a `gfdit profile` output; None: the analytic model
    execution: ExecutionModel = field(default_factory=ExecutionModel)  # Note [Simulated execution]

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.seeds < 1 or self.num_requests < 1 or self.chunk_steps < 1:
            raise ValueError("world size, seeds, requests and chunk steps must be >= 1")
        if not self.loads or any(not (x > 0 and math.isfinite(x)) for x in self.loads):
            raise ValueError(f"loads must be > 0, got {self.loads}")
        if not self.policies:
            raise ValueError("give at least one policy")
        for spec in self.policies:
            make_policy(spec)  # PolicySpecError (a ValueError) names the problem

    def cost_model(self) -> AnalyticCostModel:
        """A fresh cost model (the scheduler's learns as it runs)."""
        cost = AnalyticCostModel()
        if self.cost_profile is not None:
            from gfdit.cost import apply_profile

            apply_profile(cost, self.cost_profile)
        return cost


def _run_metrics(sched: Scheduler, res, records) -> dict:
    cls = {r.request_id: r.cls for r in records}
    done = [o for o in res.outcomes.values() if o.state is RequestState.DONE]
    per_class: dict[str, list[bool]] = {}
    for o in res.outcomes.values():
        per_class.setdefault(cls[o.request_id], []).append(bool(o.met_deadline))
    recs = [sched.record(r.request_id) for r in records]
    degrees = [len(e.ranks) for e in res.trace if e.task.kind.name == "DENOISE"]
    return {
        "num_requests": len(records),
        "completed": len(done),
        "throughput_rps": res.throughput_rps,
        "mean_latency_s": res.mean_latency_s,
        "p99_latency_s": res.latency_percentile(99),
        "slo": res.deadline_attainment,
        "slo_per_class": {c: sum(v) / len(v) for c, v in sorted(per_class.items())},
        "gpu_s": sum((e.end_s - e.start_s) * len(e.ranks) for e in res.trace),
        "preemptions": sched.num_preemptions,
        "reshards": sum(r.num_reshards for r in recs),
        "reshard_bytes": sum(r.bytes_moved for r in recs),
        "mean_chunk_degree": statistics.fmean(degrees) if degrees else math.nan,
        "makespan_s": res.end_s - res.start_s,
    }


def run_sweep(cfg: SweepConfig, progress=None) -> dict:
    """Every (load, seed, policy) run; returns {"config", "standalone_s", "runs": [...]}.
    `progress(text)` is called after each run when given."""
    video = get_profile(cfg.model).video
    classes = mix_classes(cfg.mix, video=video)
    standalone = analytic_standalone(cfg.model, classes, cfg.cost_model())
    runs = []
    for load in cfg.loads:
        rate = rate_for_load(load, cfg.world_size, classes, standalone)
        duration = cfg.num_requests / rate
        for seed in range(cfg.seeds):
            spec = WorkloadSpec(
                cfg.model, duration, (Phase(0.0, rate),), classes, 1.0, seed, standalone,
                "profiled" if cfg.cost_profile else "analytic", mix=cfg.mix, target_load=load,
                world_size=cfg.world_size,
            )  # fmt: skip
            records = generate(spec)
            requests = [r.to_request() for r in records]
            offered = offered_load(records, cfg.world_size, duration)
            for policy in cfg.policies:
                sched = Scheduler(
                    cfg.world_size, make_policy(policy), cfg.cost_model(), chunk_steps=cfg.chunk_steps
                )
                res = simulate(sched, requests, true_cost=cfg.cost_model(), execution=cfg.execution)
                row = {
                    "policy": policy,
                    "load": load,
                    "seed": seed,
                    "rate_rps": rate,
                    "offered_load": offered,
                }
                row.update(_run_metrics(sched, res, records))
                runs.append(row)
                if progress is not None:
                    progress(
                        f"load {load} seed {seed} {policy}: slo {row['slo']:.3f} mean {row['mean_latency_s']:.2f} s"
                    )
    config = {
        "model": cfg.model, "world_size": cfg.world_size, "mix": cfg.mix, "loads": list(cfg.loads),
        "policies": list(cfg.policies), "seeds": cfg.seeds, "num_requests": cfg.num_requests,
        "chunk_steps": cfg.chunk_steps, "execution": cfg.execution.to_json(),
        "cost_profile": None if cfg.cost_profile is None else {
            k: cfg.cost_profile.get(k) for k in ("model", "card", "world_size", "date", "command")
        },
    }  # fmt: skip
    check = degree_check(cfg.cost_profile) if cfg.cost_profile is not None else None
    return {"config": config, "standalone_s": standalone, "degree_check": check, "runs": runs}


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


kMetrics = (
    "throughput_rps", "mean_latency_s", "p99_latency_s", "slo", "gpu_s", "preemptions", "reshards",
    "reshard_bytes", "mean_chunk_degree", "completed",
)  # fmt: skip


def summarize(result: dict) -> dict:
    """Means over seeds per (policy, load), goodput per policy, and the issue's target tables."""
    runs = result["runs"]
    policies = result["config"]["policies"]
    loads = result["config"]["loads"]
    table: dict[str, dict[str, dict]] = {}
    for p in policies:
        table[p] = {}
        for load in loads:
            rows = [r for r in runs if r["policy"] == p and r["load"] == load]
            cell = {k: _mean([r[k] for r in rows]) for k in kMetrics}
            classes = sorted({c for r in rows for c in r["slo_per_class"]})
            cell["slo_per_class"] = {
                c: _mean([r["slo_per_class"].get(c, math.nan) for r in rows]) for c in classes
            }
            table[p][str(load)] = cell
    goodput = {}
    for p in policies:
        ok = [load for load in loads if table[p][str(load)]["slo"] >= kSloTarget]
        best = max(ok) if ok else None
        goodput[p] = {
            "load": best,
            "goodput_rps": table[p][str(best)]["throughput_rps"] if best is not None else 0.0,
        }
    return {"table": table, "goodput": goodput, "targets": _targets(result["config"], table, goodput)}


def _kind(spec: str) -> str:
    name = spec.partition(":")[0]
    if name in kStaticNames:
        return "static"
    return "tetriserve" if name == "tetriserve" else "elastic"


def _ratio(a: float, b: float) -> float | None:
    if b is None or a is None or math.isnan(a) or math.isnan(b):
        return None
    if b == 0:
        return math.inf if a > 0 else None
    return a / b


def _targets(config: dict, table: dict, goodput: dict) -> dict:
    """The issue's targets, each with the numbers it compares and whether it is met."""
    policies = config["policies"]
    world = config["world_size"]
    elastic = [p for p in policies if _kind(p) == "elastic"]
    statics = [p for p in policies if _kind(p) == "static"]
    fixed = next((p for p in policies if p.replace(" ", "") in (f"static:sp={world}",)), None)
    tetri = next((p for p in policies if _kind(p) == "tetriserve"), None)
    out: dict = {}
    if not elastic:
        return out
    best_el = max(elastic, key=lambda p: (goodput[p]["goodput_rps"], -len(p)))
    best_st = max(statics, key=lambda p: goodput[p]["goodput_rps"]) if statics else None

    def check(value, bound):
        return None if value is None else bool(value >= bound)

    g = {p: goodput[p]["goodput_rps"] for p in policies}
    if fixed:
        r = _ratio(g[best_el], g[fixed])
        out["goodput_vs_fixed_pipeline"] = {"elastic": best_el, "baseline": fixed, "elastic_rps": g[best_el],
                                            "baseline_rps": g[fixed], "ratio": r, "bound": 6.0, "met": check(r, 6.0)}  # fmt: skip
    if best_st:
        r = _ratio(g[best_el], g[best_st])
        out["goodput_vs_best_static"] = {"elastic": best_el, "baseline": best_st, "elastic_rps": g[best_el],
                                         "baseline_rps": g[best_st], "ratio": r, "bound": 1.5, "met": check(r, 1.5)}  # fmt: skip
    at = "0.8" if "0.8" in next(iter(table.values())) else None
    if at is not None:
        slo = {p: table[p][at]["slo"] for p in policies}
        best_el8 = max(elastic, key=lambda p: slo[p])
        if statics:
            st8 = max(statics, key=lambda p: slo[p])
            r = _ratio(slo[best_el8], slo[st8])
            out["slo_at_0.8_vs_best_static"] = {"elastic": best_el8, "baseline": st8, "elastic_slo": slo[best_el8],
                                               "baseline_slo": slo[st8], "ratio": r, "bound": 1.3, "met": check(r, 1.3)}  # fmt: skip
        if tetri:
            r = _ratio(slo[best_el8], slo[tetri])
            out["slo_at_0.8_vs_tetriserve"] = {"elastic": best_el8, "baseline": tetri, "elastic_slo": slo[best_el8],
                                              "baseline_slo": slo[tetri], "ratio": r, "bound": 1.1, "met": check(r, 1.1)}  # fmt: skip
        if fixed:
            mean = {p: table[p][at]["mean_latency_s"] for p in policies}
            r = _ratio(mean[best_el8], mean[fixed])
            out["mean_latency_at_0.8_vs_fixed_pipeline"] = {
                "elastic": best_el8, "baseline": fixed, "elastic_s": mean[best_el8], "baseline_s": mean[fixed],
                "ratio": r, "bound": 0.10, "met": None if r is None else bool(r <= 0.10),
            }  # fmt: skip
    return out


def _f(x, pattern="{:.3g}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return pattern.format(x)


def render_markdown(result: dict, summary: dict) -> str:
    c = result["config"]
    lines = [
        f"# gfdit eval sweep: {c['model']}, {c['world_size']} simulated ranks, mix {c['mix']}",
        "",
        f"Loads {c['loads']}, {c['seeds']} seed(s) of ~{c['num_requests']} requests each, chunk_steps "
        f"{c['chunk_steps']}. Standalone one-rank seconds per class: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in result["standalone_s"].items()) + ".",
        "",
        "## Targets",
        "",
        "| target | elastic | baseline | elastic value | baseline value | ratio | bound | met |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for name, t in summary["targets"].items():
        vals = [v for k, v in t.items() if k.startswith("elastic_")] + [
            v for k, v in t.items() if k.startswith("baseline_")
        ]
        bound = ("≤ " if name.startswith("mean_latency") else "≥ ") + _f(t["bound"])
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(
            f"| {name} | {t['elastic']} | {t['baseline']} | {_f(vals[0], '{:.4g}')} | {_f(vals[1], '{:.4g}')} | "
            f"{_f(t['ratio'], '{:.3g}')} | {bound} | {met} |"
        )
    lines += ["", "## Goodput (throughput at >= 90 % SLO attainment)", "",
              "| policy | highest load with >= 90 % SLO | throughput there (req/s) |", "| --- | ---: | ---: |"]  # fmt: skip
    for p, g in summary["goodput"].items():
        lines.append(f"| {p} | {_f(g['load'])} | {_f(g['goodput_rps'], '{:.4g}')} |")
    for load in c["loads"]:
        lines += ["", f"## Load {load}", "",
                  "| policy | throughput (req/s) | mean latency (s) | P99 (s) | SLO | SLO per class | GPU-s | "
                  "preemptions | reshards | reshard MiB | mean degree |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for p in c["policies"]:
            m = summary["table"][p][str(load)]
            per = " ".join(f"{k} {_f(v, '{:.2f}')}" for k, v in m["slo_per_class"].items())
            lines.append(
                f"| {p} | {_f(m['throughput_rps'], '{:.4f}')} | {_f(m['mean_latency_s'], '{:.2f}')} | "
                f"{_f(m['p99_latency_s'], '{:.2f}')} | {_f(m['slo'], '{:.3f}')} | {per} | {_f(m['gpu_s'], '{:.0f}')} | "
                f"{_f(m['preemptions'], '{:.1f}')} | {_f(m['reshards'], '{:.1f}')} | "
                f"{_f(m['reshard_bytes'] / 2**20, '{:.1f}')} | {_f(m['mean_chunk_degree'], '{:.2f}')} |"
            )
    return "\n".join(lines) + "\n"


def _plots(result: dict, summary: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["config"]
    loads = c["loads"]
    files = []
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 policies, dashes after 10
    style = {p: (colors[i % 20], "-" if i < 10 else "--") for i, p in enumerate(c["policies"])}
    panels = [
        ("throughput_rps", "throughput (req/s)"), ("mean_latency_s", "mean latency (s)"),
        ("p99_latency_s", "P99 latency (s)"), ("slo", "SLO attainment"), ("gpu_s", "GPU-seconds"),
        ("preemptions", "preemptions"), ("reshards", "reshards"), ("reshard_bytes", "reshard bytes"),
    ]  # fmt: skip
    for key, label in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for p in c["policies"]:
            color, dash = style[p]
            ax.plot(
                loads,
                [summary["table"][p][str(x)][key] for x in loads],
                dash,
                color=color,
                marker="o",
                ms=3,
                label=p,
            )
        ax.set_xlabel("target load ρ")
        ax.set_ylabel(label)
        if key in ("mean_latency_s", "p99_latency_s"):
            ax.set_yscale("log")
        ax.set_title(f"{c['model']}, {c['world_size']} ranks, {c['mix']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        name = f"{key}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    classes = sorted(
        {k for p in c["policies"] for cell in summary["table"][p].values() for k in cell["slo_per_class"]}
    )
    fig, axes = plt.subplots(1, max(1, len(classes)), figsize=(4.2 * max(1, len(classes)), 3.8), sharey=True)
    axes = axes if len(classes) > 1 else [axes]
    for ax, cls in zip(axes, classes, strict=False):
        for p in c["policies"]:
            ax.plot(loads, [summary["table"][p][str(x)]["slo_per_class"].get(cls, math.nan) for x in loads],
                    style[p][1], color=style[p][0], marker="o", ms=3, label=p)  # fmt: skip
        ax.set_title(f"class {cls}")
        ax.set_xlabel("target load ρ")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "slo_per_class.png"), dpi=110)
    plt.close(fig)
    files.append("slo_per_class.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(summary["goodput"])
    ax.barh(names, [summary["goodput"][p]["goodput_rps"] for p in names])
    ax.set_xlabel("throughput at ≥ 90 % SLO attainment (req/s)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "goodput.png"), dpi=110)
    plt.close(fig)
    files.append("goodput.png")
    return files


def replot(out_dir: str) -> list[str]:
    """Redraw the PNG plots of a sweep from its results.json."""
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    return _plots(data, data["summary"], out_dir)


def write_sweep(result: dict, out_dir: str, plots: bool = True) -> dict:
    """results.json (config, every run, the summary), results.md and PNG plots in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(result)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**result, "summary": summary}, f, indent=1, allow_nan=True)
    md = render_markdown(result, summary)
    if result.get("degree_check"):
        md += "\n" + render_degree_check(result["degree_check"])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    if plots:
        summary["plots"] = _plots(result, summary, out_dir)
    return summary


def degree_check(profile: dict) -> dict:
    """How the cost model extrapolates a profile to unmeasured degrees, checked against the profile.

    An unmeasured key is estimated as the analytic formula (Note [Cost model]) times the mean
    measured/analytic ratio of its kind. Check: hold out each size's largest measured degree, load
    the rest, and compare the estimate of the held-out one with its measurement. Also lists the
    estimates at twice the largest measured degree (e.g. 8 from an SP <= 4 profile)."""
    from gfdit.tasks import TaskKind

    model = profile["model"]
    rows = [r for r in profile["observations"] if r["kind"] == "DENOISE"]
    sizes = sorted({(r["width"], r["height"], r["frames"]) for r in rows})
    top = max(r["degree"] for r in rows)
    out = []
    for w, h, f in sizes:
        mine = {
            r["degree"]: r["seconds"] for r in rows if (r["width"], r["height"], r["frames"]) == (w, h, f)
        }
        held = max(mine)
        if len(mine) < 2:
            continue
        cost = AnalyticCostModel()
        for r in profile["observations"]:
            key = (r["width"], r["height"], r["frames"])
            if r["kind"] == "DENOISE" and key == (w, h, f) and r["degree"] == held:
                continue
            cost.set_observed(
                TaskKind[r["kind"]], model, r["width"], r["height"], r["frames"], r["degree"], r["seconds"]
            )
        predicted = cost.step_time(model, w, h, f, held)
        full = AnalyticCostModel()
        from gfdit.cost import apply_profile

        apply_profile(full, profile)
        out.append({
            "size": [w, h, f], "measured_s": {str(d): s for d, s in sorted(mine.items())}, "held_out_degree": held,
            "predicted_s": predicted, "relative_error": predicted / mine[held] - 1.0,
            "analytic_s": {str(d): full.analytic_step_time(model, w, h, f, d) for d in (*sorted(mine), 2 * top)},
            f"estimate_degree_{2 * top}_s": full.step_time(model, w, h, f, 2 * top),
        })  # fmt: skip
    full = AnalyticCostModel()
    from gfdit.cost import apply_profile

    apply_profile(full, profile)
    return {"model": model, "factor": full.factor(TaskKind.DENOISE, model), "sizes": out}


def render_degree_check(check: dict) -> str:
    lines = [
        f"## How degrees beyond the profile are estimated ({check['model']})",
        "",
        "Unmeasured (size, degree) keys: the analytic step formula (Note [Cost model]: c0 + (aN + bN²)/d +"
        f" Ulysses all-to-all terms growing with d) times the mean measured/analytic DENOISE ratio of the "
        f"profile ({check['factor']:.3f}). Check: each size's largest measured degree held out and predicted"
        " from the other measurements.",
        "",
        "| size | measured s/step by degree | held out | predicted | error | estimate at 2× the top degree |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in check["sizes"]:
        w, h, f = s["size"]
        size = f"{w}x{h}" + (f"x{f}" if f else "")
        measured = ", ".join(f"{d}: {v * 1e3:.1f} ms" for d, v in s["measured_s"].items())
        est = next(v for k, v in s.items() if k.startswith("estimate_degree_"))
        lines.append(
            f"| {size} | {measured} | {s['held_out_degree']} | {s['predicted_s'] * 1e3:.1f} ms | "
            f"{s['relative_error'] * 100:+.1f} % | {est * 1e3:.1f} ms |"
        )
    return "\n".join(lines) + "\n"
