"""The `gfdit` command.

    gfdit serve --nproc 4 --model tiny-flux --policy edf-best-fit --port 8000
        starts 4 ranks of gfdit.serve on this node and supervises them (gfdit.launch: a loopback-only
        store, a fresh launch secret in GFDIT_SECRET, --api-key moved into GFDIT_API_KEY so that it
        is never on a command line); the options other than --nproc are gfdit.serve's
    gfdit bench gen --model tiny-flux --rate 2 --duration 60 --alpha 3 --seed 0 --out trace.jsonl
    gfdit bench run --url http://127.0.0.1:8000 --trace trace.jsonl --out runs/edf
    gfdit bench report runs/edf runs/static --out report/
    gfdit tune --trace trace.jsonl --world-size 4 --search "edf-best-fit:chunk=1|2|4" --out tune/
    gfdit profile --nproc 4 --model flux-dev --sizes 512,1024 --out flux.json   (ranks, like serve)
    gfdit eval sweep|fidelity ...   (gfdit.eval.cli)

Usage errors exit with status 2 (argparse), before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from gfdit.scheduler import kDefaultChunkSteps

__all__ = ["main", "build_parser"]

kShutdownMarginS = 15.0  # after the drain: the engine closes, every rank leaves; later ones are killed


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfdit", description="gf-dit: elastic serving of diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)

    # serve and profile are parsed by their own modules' parsers (main): listed here for --help.
    sub.add_parser("serve", help="serve a model over HTTP on N ranks of this node (gfdit serve --help)")

    b = sub.add_parser("bench", help="serving benchmarks: gen, run, alone, report")
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
    r.add_argument(
        "--out",
        required=True,
        help="directory for results.jsonl and run.json (with the server's chunk batch-size histogram "
        "over the run, from GET /metrics before and after)",
    )
    r.add_argument("--label", default=None, help="name of the run in reports (default: the server's policy)")
    r.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (default 1)")
    r.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request before it counts as failed"
    )
    r.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr: requests sent, done, failed, elapsed (default: when stderr is a terminal)",
    )
    r.add_argument(
        "--save-images",
        action="store_true",
        help="write every completed image to OUT/images/REQUEST_ID.png (for `gfdit bench alone`)",
    )

    a = bsub.add_parser(
        "alone",
        help="compare a run's images with the same requests served alone",
        description="Send a sample of a `gfdit bench run --save-images` run's image requests again, one "
        "at a time, to an otherwise idle server and compare each image with the one the run got "
        "(mean and largest absolute uint8 pixel difference). Writes RUN/alone.json; exits 1 when an "
        "image's mean difference is over --max-mean-diff.",
    )
    a.add_argument("--url", required=True, help="server base URL (the same server configuration as the run)")
    a.add_argument("--run", required=True, help="a directory written by `gfdit bench run --save-images`")
    a.add_argument(
        "--sample", type=int, default=20, help="requests to re-send, spread over the trace (default 20)"
    )
    a.add_argument(
        "--max-mean-diff",
        type=float,
        default=2.0,
        help="bound on an image's mean |difference|, in 1/255 (default 2)",
    )
    a.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    for sp in (g, r, a):
        sp.add_argument(
            "--api-key",
            default=None,
            help="the server's API key (gfdit serve --api-key), sent as 'Authorization: Bearer KEY'; "
            "default: $GFDIT_API_KEY",
        )

    rep = bsub.add_parser(
        "report",
        help="summarize runs side by side (JSON, markdown, PNG)",
        description="Summarize `gfdit bench run` outputs side by side: per run and per request class, "
        "throughput, mean/P50/P99 latency and SLO attainment; per run, the batch size of the DENOISE "
        "chunks (request-chunks, mean, max, share batched, histogram by size: 1 is a chunk run alone). "
        "Batch sizes come from the server's gfdit_chunk_batch_size histogram, scraped from /metrics by "
        "`bench run` before and after the run (the responses carry none): every request that ended on "
        "the server meanwhile counts, and a run whose scrape failed shows none, with the reason. "
        "Writes report.json, report.md and PNG plots under --out and prints report.md.",
    )
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
    t.add_argument(
        "--chunk-steps",
        type=int,
        default=kDefaultChunkSteps,
        help=f"the server's --chunk-steps (default {kDefaultChunkSteps})",
    )
    t.add_argument("--noise", type=float, default=0.0, help="log-normal sigma on task times (default 0)")
    t.add_argument("--seeds", type=int, default=1, help="simulations per candidate with noise (default 1)")
    t.add_argument("--out", default=None, help="directory for results.json and results.md")
    t.add_argument(
        "--cost-profile", default=None, help="calibrate the simulation with `gfdit profile`'s output"
    )

    sub.add_parser(
        "profile",
        help="measure the model's task times on N ranks of this node into a cost profile (gfdit profile --help)",
    )

    from gfdit.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return p


def _without_api_key(args: list[str]) -> tuple[list[str], str | None]:
    """`args` without `--api-key KEY` / `--api-key=KEY`, and the key (the last one given)."""
    out, key, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--api-key" and i + 1 < len(args):
            key, i = args[i + 1], i + 2
            continue
        if a.startswith("--api-key="):
            key, i = a.split("=", 1)[1], i + 1
            continue
        out.append(a)
        i += 1
    return out, key


def launch_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of the ranks `gfdit serve` starts: a fresh launch secret (Note [Control-plane
    authentication] in gfdit.runtime.auth) unless the caller gave one. (The API key travels in the
    environment too, GFDIT_API_KEY: readable by this user only, where a command line is not.)"""
    from gfdit.runtime.auth import kSecretEnv, kSecretFileEnv, make_secret

    env = dict(environ)
    if not env.get(kSecretEnv) and not env.get(kSecretFileEnv):
        env[kSecretEnv] = make_secret()
    return env


def _launch(nproc: int, module: str, rest: list[str], shutdown_timeout_s: float, env: dict[str, str]) -> int:
    """Print what runs, then start and supervise the ranks (gfdit.launch)."""
    from gfdit.launch import launch, rank_command

    _out(f"+ {nproc} x " + shlex.join(rank_command(module, rest)))
    sys.stdout.flush()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [launcher] %(levelname)s %(name)s: %(message)s"
    )
    return launch(nproc, module, rest, shutdown_timeout_s=shutdown_timeout_s, environ=env)


def _ranks_command(name: str, argv: list[str]) -> int:
    """`gfdit serve` / `gfdit profile`: the module's own options plus --nproc, checked here (a mistake
    exits 2 before any rank starts), then --nproc ranks of the module with the other options."""
    import importlib

    module = importlib.import_module(f"gfdit.{name}")
    parser = module.build_parser(prog=f"gfdit {name}")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this node (default 1)")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if name == "serve":
        module.check_args(parser, args)
    split = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    split.add_argument("--nproc", type=int)
    rest = split.parse_known_args(argv)[1]
    if name == "serve":
        rest, key = _without_api_key(rest)
        if parser.parse_args(rest).api_key is not None:  # an abbreviation of --api-key slipped by
            parser.error("spell the option out as --api-key KEY (or set GFDIT_API_KEY)")
        if key is not None:
            # This process supervises the ranks for as long as they run: its own command line must not
            # show the key either. Become the same command without it, the key in the environment.
            env = dict(os.environ)
            env[module.kApiKeyEnv] = key
            argv0 = [sys.executable, "-m", "gfdit.cli", "serve", "--nproc", str(args.nproc), *rest]
            sys.stdout.flush()
            os.execve(sys.executable, argv0, env)
    shutdown_s = getattr(args, "drain_timeout", 0.0) + kShutdownMarginS
    return _launch(args.nproc, f"gfdit.{name}", rest, shutdown_s, launch_env(dict(os.environ)))


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
            from gfdit.cost import AnalyticCostModel, apply_profile, read_profile

            cost = AnalyticCostModel()
            apply_profile(cost, read_profile(args.cost_profile, model=args.model))
            standalone = workload.analytic_standalone(args.model, classes, cost)
            source = "profiled"
        if args.calibrate_url:
            from gfdit.bench.client import calibrate

            key = _client_api_key(args)
            standalone, source = calibrate(args.calibrate_url, args.model, classes, api_key=key), "calibrated"
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
        command=_redacted_command(), api_key=_client_api_key(args),
        show_progress=sys.stderr.isatty() if args.progress is None else args.progress,
        save_images=args.save_images,
    )  # fmt: skip
    what = f"{run['num_requests']} requests against {args.url} ({run['policy']})"
    _out(f"{what} in {run['wall_s']:.1f} s -> {args.out}")
    return 0


def _alone(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.bench.alone import compare_alone

    if not os.path.isfile(os.path.join(args.run, "run.json")):
        parser.error(f"--run: {args.run!r} is not a `gfdit bench run` directory (no run.json)")
    if args.sample < 1 or args.max_mean_diff < 0 or args.timeout <= 0:
        parser.error("--sample must be >= 1, --max-mean-diff >= 0 and --timeout > 0")
    try:
        out = compare_alone(
            args.url, args.run, sample=args.sample, max_mean_diff=args.max_mean_diff, timeout_s=args.timeout,
            api_key=_client_api_key(args),
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    _out(
        f"{out['sample']} images of {args.run} against the same requests alone: largest mean difference "
        f"{out['largest_mean_abs_diff']:.3f}/255, largest pixel difference {out['largest_max_abs_diff']}/255; "
        f"{len(out['over'])} over {args.max_mean_diff}/255 -> {os.path.join(args.run, 'alone.json')}"
    )
    return 1 if out["over"] else 0


def _client_api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("GFDIT_API_KEY") or None


def _redacted_command() -> str:
    """This command line for run.json, the API key replaced."""
    argv, out = sys.argv[1:], []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--api-key":
            out.append("REDACTED")
        else:
            out.append("--api-key=REDACTED" if a.startswith("--api-key=") else a)
    return shlex.join(["gfdit", *out])


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
            from gfdit.cost import read_profile

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
        tied = tune.tied_best(ranked, args.objective)
        if len(tied) > 1 and best in tied:
            _out(
                f"best: {best.spec} (tied with {len(tied) - 1} other{'s' if len(tied) > 2 else ''}: see above)"
            )
        elif best is not ranked[0] and ranked[0].error is None:
            _out(f"best: {best.spec} (the baseline {ranked[0].spec} ranks above it)")
        else:
            _out(f"best: {best.spec}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("serve", "profile"):
        return _ranks_command(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune":
        return _tune(parser, args)
    if args.command == "eval":
        from gfdit.eval.cli import run_eval

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        return run_eval(parser, args)
    handler = {"gen": _gen, "run": _run, "alone": _alone, "report": _report}[args.bench_command]
    return handler(parser, args)


if __name__ == "__main__":
    sys.exit(main())
