"""The `gfdit eval` subcommands' parsers and handlers (gfdit.cli registers them).

    gfdit eval sweep --model flux-dev --world-size 8 --cost-profile flux-dev-h100x4.json \\
        --mix paper-image --loads 0.5,0.8,1.0 --policies "static:sp=8;edf-best-fit" --seeds 3 --out DIR
    gfdit eval fidelity --trace trace.jsonl --policies "static:sp=4;edf-best-fit" \\
        --serve-args "--nproc 4 --model tiny-flux" --out DIR       (or --url URL for one running server)
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import replace

from gfdit.scheduler import kDefaultChunkSteps

__all__ = ["add_eval_parser", "run_eval"]

log = logging.getLogger("gfdit.eval")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _policies(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(";") if p.strip())


def _execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host-overhead-s", type=float, default=0.0,
        help="simulated seconds of host overhead per task (engine<->worker round trip, syncs; default 0)",
    )  # fmt: skip
    p.add_argument(
        "--reshard-latency-s", type=float, default=None,
        help="simulated seconds per reshard (default: the H100 line, 65 us + bytes at 36 GB/s)",
    )  # fmt: skip
    p.add_argument(
        "--reshard-bandwidth", type=float, default=None, help="bytes/s of reshards (with the above)"
    )
    p.add_argument(
        "--cpu-cores", type=int, default=0,
        help="CPU runs: the ranks share this many cores (tasks slow down when more ranks are busy; default 0: no sharing)",
    )  # fmt: skip
    p.add_argument(
        "--sharing", default=None,
        help="CPU runs: bench/fidelity_concurrency.py's JSON, the measured slowdown of k processes on the "
        "shared cores (default: the ideal max(1, k / cores))",
    )  # fmt: skip
    p.add_argument(
        "--plain-sim", action="store_true",
        help="no execution model: tasks cost their cost-model time only (the old simulator)",
    )  # fmt: skip


def sharing_points(path: str) -> tuple[tuple[float, float], ...]:
    """ExecutionModel.sharing from bench/fidelity_concurrency.py's JSON: per process count, the mean
    slowdown over the sizes it measured."""
    import json

    with open(path) as f:
        rows = json.load(f)["rows"]
    by_k: dict[float, list[float]] = {}
    for r in rows:
        by_k.setdefault(float(r["procs"]), []).append(float(r["ratio"]))
    if not by_k:
        raise ValueError(f"{path}: no measurements")
    return tuple((k, sum(v) / len(v)) for k, v in sorted(by_k.items()))


def execution_model(args: argparse.Namespace):
    from gfdit.simexec import ExecutionModel, kH100ReshardBandwidth, kH100ReshardLatencyS

    if args.plain_sim:
        return ExecutionModel()
    lat = kH100ReshardLatencyS if args.reshard_latency_s is None else args.reshard_latency_s
    bw = kH100ReshardBandwidth if args.reshard_bandwidth is None else args.reshard_bandwidth
    sharing = () if args.sharing is None else sharing_points(args.sharing)
    return replace(
        ExecutionModel.worker(args.host_overhead_s, lat, bw), cores=args.cpu_cores, sharing=sharing
    )


def add_eval_parser(sub) -> None:
    """Add `eval` with its `sweep` and `fidelity` subcommands to the `gfdit` subparsers `sub`."""
    e = sub.add_parser("eval", help="paper-scale evaluation: simulated sweeps, simulator fidelity")
    esub = e.add_subparsers(dest="eval_command", required=True)

    s = esub.add_parser("sweep", help="simulate load x policy x seed on a named mix (gfdit.eval.sweep)")
    s.add_argument("--model", required=True, help="model preset")
    s.add_argument("--world-size", type=int, required=True, help="simulated ranks")
    s.add_argument("--cost-profile", default=None, help="`gfdit profile` output calibrating the cost model")
    s.add_argument("--mix", required=True, help="named mix: paper-image, paper-video")
    s.add_argument("--loads", type=_floats, required=True, help="target loads, e.g. 0.5,0.8,1.0")
    s.add_argument("--policies", type=_policies, required=True, help='policy specs separated by ";"')
    s.add_argument("--seeds", type=int, default=1, help="traces per load (default 1)")
    s.add_argument("--num-requests", type=int, default=200, help="requests per trace (default 200)")
    s.add_argument(
        "--chunk-steps",
        type=int,
        default=kDefaultChunkSteps,
        help=f"the scheduler's chunk_steps (default {kDefaultChunkSteps})",
    )
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--out", required=True, help="directory for results.json, results.md and plots")
    _execution_args(s)

    f = esub.add_parser(
        "fidelity", help="measure the simulator's error: real servers vs the simulator on one trace"
    )
    f.add_argument("--trace", required=True, help="trace file from `gfdit bench gen`")
    f.add_argument("--policies", type=_policies, default=(), help='policy specs separated by ";"')
    f.add_argument(
        "--serve-args", default="",
        help='`gfdit serve` options without --policy, e.g. "--nproc 4 --model tiny-flux"; a server is started per policy',
    )  # fmt: skip
    f.add_argument("--url", default=None, help="replay against this running server instead (its one policy)")
    f.add_argument(
        "--cost-profile", default=None, help="calibrate the simulation with `gfdit profile`'s output"
    )
    f.add_argument(
        "--chunk-steps",
        type=int,
        default=kDefaultChunkSteps,
        help=f"the server's --chunk-steps (default {kDefaultChunkSteps})",
    )
    f.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (default 1)")
    f.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    f.add_argument(
        "--health-timeout", type=float, default=300.0, help="seconds to wait for a server (default 300)"
    )
    f.add_argument(
        "--calibrate-overhead", action="store_true",
        help="calibrate from each idle server's lone requests: the compute scale, the host CPU per request (with "
        "--cpu-cores) and the per-task host overhead (overrides --host-overhead-s)",
    )  # fmt: skip
    f.add_argument(
        "--repeats", type=int, default=1,
        help="measurements of the trace per policy, each on a fresh server (default 1; with --url: replays on "
        "it); measured = their mean, and the report shows how far one strays from it (the measurement's own "
        "spread)",
    )  # fmt: skip
    f.add_argument("--out", required=True, help="directory for fidelity.json, fidelity.md and the runs")
    _execution_args(f)


def run_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.eval_command == "sweep":
        return _sweep(parser, args)
    return _fidelity(parser, args)


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.eval.sweep import SweepConfig, run_sweep, write_sweep

    try:
        profile = None
        if args.cost_profile:
            from gfdit.cost import read_profile

            profile = read_profile(args.cost_profile, model=args.model)
        cfg = SweepConfig(
            args.model, args.world_size, args.mix, args.loads, args.policies, args.seeds, args.num_requests,
            args.chunk_steps, profile, execution_model(args),
        )  # fmt: skip
        result = run_sweep(cfg, progress=log.info)
    except ValueError as e:
        parser.error(str(e))
    result["config"]["command"] = shlex.join(["gfdit", *sys.argv[1:]])
    result["config"]["cost_profile_path"] = args.cost_profile
    write_sweep(result, args.out, plots=not args.no_plots)
    with open(f"{args.out}/results.md") as fh:
        sys.stdout.write(fh.read())
    return 0


def _fidelity(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from gfdit.eval import fidelity

    if args.url is None and not args.policies:
        parser.error("give --policies (a server is started per policy) or --url")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.url is not None and len(args.policies) > 1:
        parser.error("--url replays against one server: give at most one policy (its own)")
    try:
        report = fidelity.run_fidelity(args, execution_model(args), shlex.join(["gfdit", *sys.argv[1:]]))
    except (ValueError, fidelity.FidelityError) as e:
        parser.error(str(e))
    sys.stdout.write(fidelity.render_markdown(report))
    return 0
