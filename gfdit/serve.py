"""Serve a model over HTTP on N ranks: every rank runs the engine, rank 0 also the HTTP server.

    gfdit serve --nproc 4 --model tiny-flux --policy edf-best-fit --port 8000
    torchrun --nproc-per-node 4 -m gfdit.serve --model tiny-flux --policy edf-best-fit --port 8000

Every rank: gfcoll.init(device=...), then Engine(world, model, policy, ...). Rank 0 runs uvicorn in
its main thread; the other ranks wait for rank 0 to close the engine. Without torchrun's
environment it runs as a single rank.

Shutdown: SIGTERM or SIGINT on rank 0 (torchrun forwards the one it gets) drains the server (Note
[Accepted requests end] in gfdit.server.state): admission stops (503), accepted requests get
--drain-timeout seconds to finish, then the engine closes, failing the rest with a reason, and every
rank exits. The other ranks ignore those signals: rank 0 ends them once their work is done. A second
signal on rank 0 stops without waiting for the drain. Rank 0 exits with status 0 when every accepted
request completed (or was cancelled by its client), kExitDrainFailed when the drain had to fail some.

`gfdit serve` starts and supervises the ranks itself (gfdit.launch): it forwards the signal to rank 0,
kills ranks still running 15 s after the drain, and exits with rank 0's status. Under plain torchrun,
the agent forwards the signal to every rank, SIGKILLs them after its shutdown timeout (30 s unless
--shutdown-timeout says otherwise), and exits with status 1 and a SignalException traceback after any
signal, however cleanly the ranks drained.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import signal
import sys
import threading

import uvicorn

from gfdit.runtime.bootstrap import init_world

__all__ = ["build_parser", "check_args", "main", "kExitDrainFailed"]

log = logging.getLogger("gfdit.serve")

kExitDrainFailed = 3  # exit status of rank 0 when the drain had to fail accepted requests
kApiKeyEnv = "GFDIT_API_KEY"  # the HTTP API key when --api-key is absent


def build_parser(prog: str = "python -m gfdit.serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve a DiT model over HTTP: every rank runs the engine, rank 0 also the HTTP server.",
    )
    p.add_argument("--model", required=True, help="model preset, e.g. tiny-flux, tiny-wan, flux-dev")
    p.add_argument(
        "--policy",
        default="fcfs-elastic",
        help="scheduling policy NAME[:key=value,...], e.g. edf-best-fit:max_sp=4 (default fcfs-elastic)",
    )
    p.add_argument("--port", type=int, required=True, help="HTTP port of rank 0")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address of rank 0 (default 127.0.0.1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--weights", default=None, help="local diffusers-layout directory (default: random init)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429 (default 1024)")
    from gfdit.scheduler import kDefaultChunkSteps

    p.add_argument(
        "--chunk-steps",
        type=int,
        default=kDefaultChunkSteps,
        help=f"denoising steps per task unless the policy says otherwise (default {kDefaultChunkSteps})",
    )
    p.add_argument(
        "--max-steps", type=int, default=100, help="most num_inference_steps per request (default 100)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default 1 MiB)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        help="seconds accepted requests get to finish on SIGTERM (default 20); the exit status is "
        f"{kExitDrainFailed} if the drain had to fail some. Under torchrun directly, its agent SIGKILLs the "
        "ranks 30 s after a signal unless given --shutdown-timeout",
    )
    p.add_argument(
        "--task-timeout-factor",
        type=float,
        default=20.0,
        help="a task running longer than this many times its estimate (and the floor), plus GFCOLL_TIMEOUT_S, "
        "has hung members: they are dropped, their requests re-run on the others, /health says degraded "
        "(default 20)",
    )
    p.add_argument(
        "--task-timeout-floor",
        type=float,
        default=300.0,
        help="seconds a task may always run before it counts as hung; 0 disables the check (default 300)",
    )
    p.add_argument(
        "--cost-profile",
        default=None,
        help="a profile of this model on this machine from `gfdit profile`: the scheduler's estimates start from it",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); default: $GFDIT_API_KEY, else "
        "open. Prefer the variable: a command line is visible to every local user (`gfdit serve` moves "
        "the flag into the variable before starting the ranks)",
    )
    p.add_argument(
        "--protect-metrics",
        action="store_true",
        help="/metrics also requires the API key (/health never does)",
    )
    p.add_argument(
        "--max-request-cost",
        type=float,
        default=None,
        help="most megapixel-steps (width x height x frames x steps x n / 1e6) one call may ask for; "
        "larger ones get 400. Default: per model (flux-dev 1000, wan2.1-1.3b 8000, wan2.1-14b 4000, "
        "tiny-* 64); 0: no limit",
    )
    p.add_argument(
        "--control-host",
        default=None,
        help="address of rank 0's internal ports (engine control and liveness). Default: 127.0.0.1 when "
        "every rank is on this node, else MASTER_ADDR's interface. 0.0.0.0 exposes them on every "
        "interface (still authenticated by the launch secret): give it only when you must",
    )
    p.add_argument(
        "--task-log",
        default=None,
        metavar="FILE",
        help="rank 0 writes one JSON line per finished task to FILE: request, step range, group, dispatch "
        "and end times (what `gfdit eval fidelity` compares with the simulator, task by task)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    from gfdit.fast_options import add_arguments as add_fast_arguments

    add_fast_arguments(p)  # --compile, --cuda-graphs, --graph-memory-gib, --warm-sizes
    return p


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else GFDIT_API_KEY, else None (no key: the API is open)."""
    return args.api_key or os.environ.get(kApiKeyEnv) or None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before any collective setup; every rank checks the same
    arguments, so on a bad one they all stop (argparse: message, exit status 2)."""
    from gfdit.models.presets import get_preset
    from gfdit.policy import PolicySpecError, make_policy

    try:
        make_policy(args.policy)
    except PolicySpecError as e:
        parser.error(f"--policy: {e}")
    try:
        get_preset(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    if args.weights is not None and not os.path.isdir(args.weights):
        parser.error(f"--weights: {args.weights!r} is not a directory")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_queue", "chunk_steps", "max_steps", "max_body_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.drain_timeout < 0:
        parser.error(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.task_log is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.task_log))):
        parser.error(f"--task-log: the directory of {args.task_log!r} does not exist")
    if args.cost_profile is not None:
        from gfdit.cost import read_profile

        try:
            read_profile(args.cost_profile, model=args.model)
        except ValueError as e:
            parser.error(f"--cost-profile: {e}")
    if not (math.isfinite(args.task_timeout_factor) and args.task_timeout_factor > 0):
        parser.error(f"--task-timeout-factor must be > 0, got {args.task_timeout_factor}")
    if not (math.isfinite(args.task_timeout_floor) and args.task_timeout_floor >= 0):
        parser.error(f"--task-timeout-floor must be >= 0 (0: no check), got {args.task_timeout_floor}")
    if args.max_request_cost is not None and not (
        math.isfinite(args.max_request_cost) and args.max_request_cost >= 0
    ):
        parser.error(f"--max-request-cost must be >= 0 (0: no limit), got {args.max_request_cost}")
    key = api_key(args)
    if key is not None and (len(key) < 8 or any(c.isspace() or not c.isprintable() for c in key)):
        parser.error("--api-key / GFDIT_API_KEY: at least 8 printable characters, no spaces")
    from gfdit.fast_options import check_arguments as check_fast_arguments

    check_fast_arguments(parser, args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    # `kill -USR1 PID` prints every thread's stack of that rank to stderr (a stuck server, a slow load).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    world = init_world(args.device)
    log.info("loading %s on %s", args.model, world.device)
    status = 0
    try:
        from gfdit.fast_options import fast_kwargs
        from gfdit.runtime import Engine

        engine = Engine(
            world,
            args.model,
            args.policy,
            weights=args.weights,
            chunk_steps=args.chunk_steps,
            max_queue=args.max_queue,
            task_timeout_factor=args.task_timeout_factor,
            task_timeout_floor_s=args.task_timeout_floor or None,
            cost_profile=args.cost_profile,
            control_host=args.control_host,
            task_log=args.task_log if world.rank == 0 else None,
            **fast_kwargs(args),  # gfdit.fast_options
        )
        if world.rank == 0:
            status = _serve(engine, args)
        else:
            _follow(engine)
    except BaseException as e:  # logged before world.close(), which may wait for the other ranks
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            log.error(
                "rank %d stopped on an error: %r", world.rank, e, exc_info=not isinstance(e, SystemExit)
            )
        raise
    finally:
        world.close()
    return status


def _follow(engine) -> None:
    """Ranks other than 0: run tasks until rank 0 shuts the engine down."""

    def ignore(sig, _frame):
        log.info("signal %d ignored: rank 0 ends this rank once its requests are done", sig)

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
    engine.close(timeout=None)
    log.info("rank %d: rank 0 closed the engine; leaving", engine.world.rank)


def _serve(engine, args: argparse.Namespace) -> int:
    """Rank 0: HTTP until a signal; returns the exit status. Whatever ends it (an error building the
    app included), the engine closes, which ends the other ranks."""
    server = None
    unfinished = 0
    try:
        from gfdit.server import ServerConfig, create_app

        config = ServerConfig(
            policy=args.policy,
            max_steps=args.max_steps,
            max_body_bytes=args.max_body_bytes,
            drain_s=args.drain_timeout,
            max_request_cost=args.max_request_cost,
            api_key=api_key(args),
            protect_metrics=args.protect_metrics,
        )
        app = create_app(engine, config)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=10,
            access_log=args.log_level == "debug",
        )
        server = _DrainingServer(uv_config, app.state.gfdit)
        # uvicorn restores the handlers it found and re-raises a signal it stopped for: let that be a no-op.
        signal.signal(signal.SIGTERM, lambda *_: None)
        log.info(
            "serving %s on http://%s:%d with %d ranks, policy %s",
            args.model, args.host, args.port, engine.world.size, engine.policy.spec(),
        )  # fmt: skip
        log.info(
            "API keys: %s; request cost limit: %s megapixel-steps",
            "required on /v1/*" + (" and /metrics" if args.protect_metrics else "")
            if config.api_key
            else "none (open)",
            f"{app.state.gfdit.max_request_cost:g}" if app.state.gfdit.max_request_cost > 0 else "none",
        )
        server.run()
    finally:
        if server is not None:
            server.join_drain()
            unfinished = server.state.num_active  # e.g. a second signal: stopped without a drain
        engine.close()
    failed = max(server.state.drain_failed, unfinished)
    if failed:
        log.warning("the drain failed %d accepted requests; exit status %d", failed, kExitDrainFailed)
        return kExitDrainFailed
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, except that its first SIGTERM/SIGINT drains (ServerState.drain, in a
    thread: the event loop keeps delivering results) before it stops; a second one stops at once."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drainer is None:
            log.info("signal %d: draining for up to %.1f s, then stopping", sig, self.state.config.drain_s)
            self._drainer = threading.Thread(target=self._drain, name="gfdit-drain", daemon=True)
            self._drainer.start()
        else:
            super().handle_exit(sig, frame)

    def _drain(self) -> None:
        try:
            self.state.drain()
        finally:
            self.should_exit = True

    def join_drain(self) -> None:
        if self._drainer is not None:
            self._drainer.join()


if __name__ == "__main__":
    sys.exit(main())
