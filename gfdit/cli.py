"""The `gfdit` command.

    gfdit serve --nproc 4 --model tiny-flux --policy edf-best-fit --port 8000
        torchrun for one node: python -m torch.distributed.run --standalone --nproc-per-node 4
        -m gfdit.serve ... (the other options are gfdit.serve's)
    gfdit bench gen --model tiny-flux --rate 2 --duration 60 --alpha 3 --seed 0 --out trace.jsonl
    gfdit bench run --url http://127.0.0.1:8000 --trace trace.jsonl --out runs/edf
    gfdit bench report runs/edf runs/static --out report/
    gfdit tune --trace trace.jsonl --world-size 4 --search "edf-best-fit:chunk=1|2|4" --out tune/
    gfdit profile --nproc 4 --model flux-dev --sizes 512,1024 --out flux.json   (torchrun, like serve)
    gfdit eval sweep|fidelity ...   (gfdit.eval.cli)

Usage errors exit with status 2 (argparse), before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys

__all__ = ["main", "build_parser", "serve_command", "serve_env"]

kShutdownMarginS = 15.0  # after the drain: the engine closes, every rank leaves


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfdit", description="gf-dit: elastic serving of diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP on N ranks of this node (torchrun)",
        description="Starts torchrun for one node running gfdit.serve; options other than --nproc "
        "are gfdit.serve's (python -m gfdit.serve --help).",
    )
    s.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this node (default 1)")

    b = sub.add_parser("bench", help="serving benchmarks: gen, run, report")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    g = bsub.add_parser("gen", help="generate a workload trace (JSON lines)")
    g.add_argument("--model", required=True, help="model preset the server serves")
    g.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    rate = g.add_mutually_exclusive_group(required=False)  # one of them, or --mmpp (checked in _gen)
    rate.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s")
    rate.add_argument("--phases", help="piecewise-Poisson: START:RATE,START:RATE,... (the first START 0)")
    rate.add_argument(
        "--target-load",
        type=float,
        help="offered load rho = sum of standalone one-rank seconds / (world size * duration); "
        "sets the mean rate (needs --world-size)",
    )
    g.add_argument(
        "--mmpp",
        default=None,
        help="bursty two-state MMPP arrivals RATE_LOW,RATE_HIGH,MEAN_LOW_S,MEAN_HIGH_S; with "
        "--target-load both rates are scaled to the load's mean rate",
    )
    g.add_argument("--world-size", type=int, default=None, help="ranks the --target-load refers to")
    g.add_argument(
        "--mix", default=None, help="named class mix: paper-image, paper-video (gfdit.bench.mixes)"
    )
    g.add_argument(
        "--class",
        dest="classes",
        action="append",
        help="NAME:size=WxH,steps=N,weight=W[,frames=F]; repeat (default: S/M/L from the model's limits)",
    )
    g.add_argument(
        "--alpha", type=float, default=3.0, help="deadline = arrival + alpha * standalone (default 3)"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--calibrate-url",
        default=None,
        help="measure each class's standalone latency on this idle server instead of the analytic cost model",
    )
    g.add_argument(
        "--cost-profile",
        default=None,
        help="take standalone latencies from the cost model calibrated by `gfdit profile`'s output",
    )
    g.add_argument("--out", required=True, help="trace file to write")

    r = bsub.add_parser("run", help="replay a trace against a running server")
    r.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    r.add_argument("--trace", required=True, help="trace file from `gfdit bench gen`")
    r.add_argument("--out", required=True, help="directory for results.jsonl and run.json")
    r.add_argument("--label", default=None, help="name of the run in reports (default: the server's policy)")
    r.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (default 1)")
    r.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request before it counts as failed"
    )

    rep = bsub.add_parser("report", help="summarize runs side by side (JSON, markdown, PNG)")
    rep.add_argument("runs", nargs="+", help="directories written by `gfdit bench run`")
    rep.add_argument("--out", required=True, help="directory for report.json, report.md and plots")
    rep.add_argument("--label", action="append", default=None, help="a label per run, in order")

    t = sub.add_parser(
        "tune",
        help="search policy parameters on a trace in the simulator (gfdit.tune)",
        description="Rank policy specs on a trace by simulating them with the server's Scheduler and "
        "policies against the analytic cost model; the best spec goes to `gfdit serve --policy`.",
    )
    t.add_argument("--trace", required=True, help="trace file from `gfdit bench gen`")
    t.add_argument("--world-size", type=int, required=True, help="ranks of the server to tune for")
    t.add_argument(
        "--search",
        action="append",
        default=[],
        help='NAME:key=v1|v2,key=...: every combination is a candidate, e.g. "edf-best-fit:chunk=1|2|4"; repeat',
    )
    t.add_argument("--baseline", action="append", default=[], help="a fixed policy spec to compare; repeat")
    t.add_argument("--objective", default="slo", choices=("slo", "mean", "p99", "throughput"))
    t.add_argument("--chunk-steps", type=int, default=2, help="the server's --chunk-steps (default 2)")
    t.add_argument("--noise", type=float, default=0.0, help="log-normal sigma on task times (default 0)")
    t.add_argument("--seeds", type=int, default=1, help="simulations per candidate with noise (default 1)")
    t.add_argument("--out", default=None, help="directory for results.json and results.md")
    t.add_argument(
        "--cost-profile", default=None, help="calibrate the simulation with `gfdit profile`'s output"
    )

    pr = sub.add_parser(
        "profile",
        help="measure the model's task times on this node and write a cost profile (torchrun)",
        description="Starts torchrun for one node running gfdit.profile; options other than --nproc "
        "are gfdit.profile's (python -m gfdit.profile --help).",
    )
    pr.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this node (default 1)")

    from gfdit.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return p


def serve_command(nproc: int, serve_args: list[str], module: str = "gfdit.serve") -> list[str]:
    """The torchrun command line `gfdit serve` (or `gfdit profile`: module gfdit.profile) runs."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", module, *serve_args,
    ]  # fmt: skip


def serve_env(environ: dict[str, str], drain_timeout_s: float) -> dict[str, str]:
    """The environment `gfdit serve` runs torchrun in. torchrun SIGKILLs the ranks a fixed time after
    forwarding SIGTERM (30 s unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT or --shutdown-timeout says
    otherwise), which would cut a longer --drain-timeout short: give it the drain plus a margin,
    unless the caller chose a value."""
    env = dict(environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(drain_timeout_s + kShutdownMarginS)))
    return env


def _exec(cmd: list[str], env: dict[str, str], shown_env: str = "") -> None:
    """Print the command, then become it (torchrun gets the signals sent to this process)."""
    _out("+ " + shown_env + shlex.join(cmd))
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    from gfdit import serve

    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    # Check gfdit.serve's options here, so that a mistake exits 2 before torchrun starts any rank.
    serve_parser = serve.build_parser(prog="gfdit serve")
    serve_args = serve_parser.parse_args(rest)
    serve.check_args(serve_parser, serve_args)
    cmd = serve_command(args.nproc, rest)
    env = serve_env(os.environ, serve_args.drain_timeout)
    _exec(cmd, env, f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']} ")
    return 0  # not reached


def _gen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.bench import workload

    try:
        if args.mix and args.classes:
            parser.error("give --mix or --class, not both")
        if args.mix:
            from gfdit.bench.mixes import mix_classes
            from gfdit.models.presets import get_preset

            classes = mix_classes(args.mix, video=get_preset(args.model).is_video)
        elif args.classes:
            classes = tuple(workload.parse_class(c) for c in args.classes)
        else:
            classes = workload.default_classes(args.model)
        standalone, source = None, "analytic"
        if args.calibrate_url and args.cost_profile:
            parser.error("give --calibrate-url or --cost-profile, not both")
        if args.cost_profile:
            from gfdit.cost import AnalyticCostModel
            from gfdit.profile import apply_profile, read_profile

            cost = AnalyticCostModel()
            apply_profile(cost, read_profile(args.cost_profile, model=args.model))
            standalone = workload.analytic_standalone(args.model, classes, cost)
            source = "profiled"
        if args.calibrate_url:
            from gfdit.bench.client import calibrate

            standalone, source = calibrate(args.calibrate_url, args.model, classes), "calibrated"
        mmpp = workload.parse_mmpp(args.mmpp) if args.mmpp else None
        if args.target_load is not None:
            if args.world_size is None:
                parser.error("--target-load needs --world-size")
            known = (
                standalone if standalone is not None else workload.analytic_standalone(args.model, classes)
            )
            mean_rate = workload.rate_for_load(args.target_load, args.world_size, classes, known)
            mmpp = mmpp.scaled(mean_rate) if mmpp is not None else None
            phases = (workload.Phase(0.0, mean_rate),)
        elif args.phases or args.rate is not None:
            if mmpp is not None:
                parser.error("--mmpp sets the rates: give it alone or with --target-load")
            phases = workload.parse_phases(args.phases) if args.phases else (workload.Phase(0.0, args.rate),)
        elif mmpp is not None:
            phases = (workload.Phase(0.0, mmpp.mean_rate),)
        else:
            parser.error("give one of --rate, --phases, --target-load or --mmpp")
        spec = workload.WorkloadSpec(
            args.model, args.duration, phases, classes, args.alpha, args.seed, standalone, source,
            mmpp=mmpp, mix=args.mix, target_load=args.target_load, world_size=args.world_size,
        )  # fmt: skip
        records = workload.generate(spec)
    except ValueError as e:
        parser.error(str(e))
    workload.write_trace(args.out, spec, records)
    counts = {c.name: sum(r.cls == c.name for r in records) for c in classes}
    _out(f"wrote {len(records)} requests to {args.out} ({counts}, SLOs from {source})")
    return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.bench.client import run_trace

    if not os.path.isfile(args.trace):
        parser.error(f"--trace: {args.trace!r} does not exist")
    if not (args.time_scale > 0 and args.timeout > 0):
        parser.error("--time-scale and --timeout must be > 0")
    run = run_trace(
        args.url, args.trace, args.out, label=args.label, time_scale=args.time_scale, timeout_s=args.timeout,
        command=shlex.join(["gfdit", *sys.argv[1:]]),
    )  # fmt: skip
    what = f"{run['num_requests']} requests against {args.url} ({run['policy']})"
    _out(f"{what} in {run['wall_s']:.1f} s -> {args.out}")
    return 0


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.bench.report import build_report

    for d in args.runs:
        if not os.path.isfile(os.path.join(d, "run.json")):
            parser.error(f"{d!r} is not a `gfdit bench run` directory (no run.json)")
    try:
        build_report(args.runs, args.out, args.label)
    except ValueError as e:
        parser.error(str(e))
    with open(os.path.join(args.out, "report.md")) as f:
        _out(f.read())
    return 0


def _profile(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    from gfdit import profile

    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    profile.build_parser(prog="gfdit profile").parse_args(rest)  # usage errors exit 2 before torchrun
    _exec(serve_command(args.nproc, rest, module="gfdit.profile"), dict(os.environ))
    return 0  # not reached


def _tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit import tune
    from gfdit.bench.workload import read_trace
    from gfdit.policy import PolicySpecError

    if not os.path.isfile(args.trace):
        parser.error(f"--trace: {args.trace!r} does not exist")
    if args.chunk_steps < 1 or args.seeds < 1 or not args.noise >= 0:
        parser.error("--chunk-steps and --seeds must be >= 1, --noise >= 0")
    try:
        meta, records = read_trace(args.trace)
        cost_profile = None
        if args.cost_profile is not None:
            from gfdit.profile import read_profile

            cost_profile = read_profile(args.cost_profile, model=meta.get("spec", {}).get("model"))
        seeds = tuple(range(args.seeds))
        ranked = tune.tune(
            records, world_size=args.world_size, searches=args.search, baselines=args.baseline,
            objective=args.objective, chunk_steps=args.chunk_steps, noise=args.noise, seeds=seeds,
            cost_profile=cost_profile,
        )  # fmt: skip
    except (ValueError, PolicySpecError) as e:
        parser.error(str(e))
    info = {
        "trace": os.path.basename(args.trace), "num_requests": len(records), "world_size": args.world_size,
        "objective": args.objective, "noise": args.noise, "seeds": list(seeds), "chunk_steps": args.chunk_steps,
        "command": shlex.join(["gfdit", *sys.argv[1:]]), "trace_meta": meta, "cost_profile": args.cost_profile,
    }  # fmt: skip
    _out(tune.write_results(args.out, ranked, info) if args.out else tune.render(ranked, info))
    best = next((c for c in ranked if c.error is None and not c.baseline), None)
    if best is not None:
        _out(f"best: {best.spec}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(parser, args, rest)
    if args.command == "profile":
        return _profile(parser, args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tune":
        return _tune(parser, args)
    if args.command == "eval":
        from gfdit.eval.cli import run_eval

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        return run_eval(parser, args)
    handler = {"gen": _gen, "run": _run, "report": _report}[args.bench_command]
    return handler(parser, args)


if __name__ == "__main__":
    sys.exit(main())
