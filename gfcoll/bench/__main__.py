"""Command line of gfcoll-bench (``python -m gfcoll.bench`` / ``gfcoll-bench``), run by every rank.

Every option is validated here, before any process group or collective exists, from the options
and the environment alone (WORLD_SIZE for the ranks of --groups), so that all ranks reach the same
verdict and a bad option ends every rank with argparse's usage message and exit status 2 instead
of a traceback or a hang.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

import torch

from .ops import OPS

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int": torch.int32,
    "int64": torch.int64,
}
REDOPS = ("sum", "avg", "max", "min")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'1K' -> 1024, '256M', '8', '4KiB' (binary units, as nccl-tests)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (expected a number with an optional K, M, G or T)"
        )
    value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def parse_groups(text: str, world_size: int) -> list[tuple[int, ...]]:
    """'0,1;0,1,2,3;1,3' -> ordered rank lists. Raises ValueError with the reason."""
    groups = []
    for k, part in enumerate(text.split(";")):
        if not part.strip():
            raise ValueError(f"group {k + 1} of {text!r} is empty")
        ranks = []
        for item in part.split(","):
            item = item.strip()
            if not re.fullmatch(r"-?\d+", item):
                raise ValueError(f"group {part!r}: {item!r} is not a rank (expected integers like '0,1,3')")
            r = int(item)
            if not 0 <= r < world_size:
                raise ValueError(f"group {part!r}: rank {r} is outside the world (WORLD_SIZE={world_size})")
            if r in ranks:
                raise ValueError(f"group {part!r}: rank {r} appears twice")
            ranks.append(r)
        groups.append(tuple(ranks))
    return groups


def default_groups(world_size: int) -> list[tuple[int, ...]]:
    """All ranks, the same reversed, a contiguous and a non-contiguous pair, an odd-sized group
    that does not start at 0, and on larger worlds the first half and the even ranks."""
    w = world_size
    cands = [list(range(w)), list(reversed(range(w)))]
    if w >= 3:
        cands += [[0, 1], [0, w - 1]]
    if w >= 4:
        cands.append(list(range(1, w)))
    if w >= 6:
        cands += [list(range(w // 2)), list(range(0, w, 2))]
    out: list[tuple[int, ...]] = []
    for c in cands:
        if tuple(c) not in out:
            out.append(tuple(c))
    return out


def build_parser() -> argparse.ArgumentParser:
    from .driver import TIMINGS  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog="gfcoll-bench",
        description="Collectives microbenchmark of gfcoll against torch.distributed on a dedicated group "
        "(nccl-tests style). Run under torchrun: every rank runs it.",
    )
    a = p.add_argument
    a("-b", "--minbytes", type=parse_size, default=parse_size("1K"), help="smallest size (default 1K)")
    a("-e", "--maxbytes", type=parse_size, default=parse_size("64M"), help="largest size (default 64M)")
    a("-f", "--stepfactor", type=int, default=2, help="size multiplier between steps, >= 2 (default 2)")
    a("--ops", default=",".join(OPS), help=f"comma-separated collectives (default all: {','.join(OPS)})")
    a(
        "--groups",
        default=None,
        help="ordered rank lists separated by ';', e.g. '0,1;0,1,2,3;1,3' "
        "(default: all ranks, reversed, contiguous and non-contiguous pairs, ...)",
    )
    a("--dtype", default="float32", help=f"element type: {', '.join(DTYPES)} (default float32)")
    a("--op", default="sum", help="reduction of all_reduce/reduce_scatter: sum, avg, max, min (default sum)")
    a("-w", "--warmup", type=int, default=5, help="untimed iterations per measurement (default 5)")
    a("-n", "--iters", type=int, default=20, help="timed iterations per measurement (default 20)")
    a(
        "--transport",
        default="auto",
        help="host (CPU tensors, baseline gloo), nccl (CUDA tensors, baseline NCCL), "
        "auto (nccl when a GPU and gfcoll's nccl transport are there; default)",
    )
    a("--graph", action="store_true", help="time CUDA-graph replays of `iters` captured operations")
    a(
        "--timing",
        choices=TIMINGS,
        default="back-to-back",
        help="eager timing: back-to-back (default, as nccl-tests: windows of `iters` operations issued "
        "back to back, each timed whole and divided; CUDA rows add the host time per call) or per-op "
        "(an event pair, or a barrier and the wall clock on CPU, around every operation)",
    )
    a("-c", "--check", action="store_true", help="verify every measurement's result against a reference")
    a(
        "--host-time",
        action="store_true",
        help="instead of the sweep: host time per call (Python call to return), eager, 1 KiB, every op "
        "(own options: --bytes, -n, -w, --device, --json; see gfcoll.bench.host_time)",
    )
    a("--json", metavar="PATH", help="write every row and the environment as JSON (and results.md beside it)")
    a("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    a("--formation-reps", type=int, default=5, help="repetitions of each group-formation method (default 5)")
    a("--no-baseline", action="store_true", help="skip the torch.distributed baseline in the sweeps")
    a("--no-formation", action="store_true", help="skip the group-formation measurements")
    a("-v", "--verbose", action="store_true", help="log progress (INFO) on every rank")
    a(
        "--split-group",
        action="store_true",
        help="also time dist.split_group (opt-in: it hung on 4 H100s with torch 2.11 after the other methods)",
    )
    return p


def _resolve_transport(parser: argparse.ArgumentParser, requested: str) -> str:
    import gfcoll  # noqa: PLC0415 - only once the options are known to parse

    if requested not in ("auto", "host", "nccl"):
        parser.error(f"argument --transport: invalid choice {requested!r} (choose from auto, host, nccl)")
    has_nccl = "nccl" in gfcoll.build_info()["transports"]
    if requested == "nccl":
        if not torch.cuda.is_available():
            parser.error("--transport nccl needs a CUDA GPU, and none is visible")
        if not has_nccl:
            parser.error(
                "--transport nccl needs gfcoll built with the nccl transport (this build has host only)"
            )
        return "nccl"
    if requested == "auto":
        return "nccl" if (has_nccl and torch.cuda.is_available()) else "host"
    return "host"


def parse_options(argv: Sequence[str] | None, environ: Mapping[str, str]):
    """Parses and validates; on a bad option prints the usage and exits with status 2."""
    from .driver import Options  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    raw_size = environ.get("WORLD_SIZE")
    raw_rank = environ.get("RANK")
    if raw_size is None or raw_rank is None:
        parser.error(
            "RANK and WORLD_SIZE are not set: launch with torchrun, e.g. torchrun --nproc-per-node 2 -m gfcoll.bench"
        )
    try:
        world_size, rank = int(raw_size), int(raw_rank)
    except ValueError:
        parser.error(f"RANK={raw_rank!r} / WORLD_SIZE={raw_size!r} are not integers")
    if world_size < 1 or not 0 <= rank < world_size:
        parser.error(f"RANK={rank} is out of range for WORLD_SIZE={world_size}")

    if args.minbytes > args.maxbytes:
        parser.error(f"--minbytes ({args.minbytes}) is larger than --maxbytes ({args.maxbytes})")
    if args.stepfactor < 2:
        parser.error(f"argument -f/--stepfactor: must be at least 2, got {args.stepfactor}")
    ops = [o.strip() for o in args.ops.split(",")]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        parser.error(f"argument --ops: unknown collective(s) {unknown} (choose from {', '.join(OPS)})")
    ops = list(dict.fromkeys(ops))
    if args.groups is None:
        groups = default_groups(world_size)
    else:
        try:
            groups = parse_groups(args.groups, world_size)
        except ValueError as e:
            parser.error(f"argument --groups: {e}")
        groups = list(dict.fromkeys(groups))
    if args.dtype not in DTYPES:
        parser.error(f"argument --dtype: unknown dtype {args.dtype!r} (choose from {', '.join(DTYPES)})")
    dtype = DTYPES[args.dtype]
    if args.op not in REDOPS:
        parser.error(f"argument --op: invalid choice {args.op!r} (choose from {', '.join(REDOPS)})")
    if args.op == "avg" and not dtype.is_floating_point:
        parser.error(f"--op avg needs a floating dtype, got {args.dtype}")
    if args.warmup < 0:
        parser.error(f"argument -w/--warmup: must be >= 0, got {args.warmup}")
    if args.iters < 1:
        parser.error(f"argument -n/--iters: must be >= 1, got {args.iters}")
    if args.formation_reps < 1:
        parser.error(f"argument --formation-reps: must be >= 1, got {args.formation_reps}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    transport = _resolve_transport(parser, args.transport)
    if args.graph and transport != "nccl":
        parser.error("--graph needs CUDA tensors (transport nccl); this run uses the host transport")

    sizes = []
    s = args.minbytes
    while s <= args.maxbytes:
        sizes.append(s)
        s *= args.stepfactor
    return Options(
        sizes=sizes,
        ops=ops,
        groups=groups,
        dtype=dtype,
        redop=args.op,
        warmup=args.warmup,
        iters=args.iters,
        transport=transport,
        graph=args.graph,
        timing=args.timing,
        check=args.check,
        json=args.json,
        plot=args.plot,
        formation_reps=args.formation_reps,
        baseline=not args.no_baseline,
        formation=not args.no_formation,
        world_size=world_size,
        rank=rank,
        argv=list(sys.argv[1:] if argv is None else argv),
        verbose=args.verbose,
        split_group=args.split_group,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = list(sys.argv[1:] if argv is None else argv)
    if "--host-time" in args:
        from .host_time import main as host_time  # noqa: PLC0415

        return host_time(args)
    opts = parse_options(argv, environ)
    logging.basicConfig(
        level=logging.INFO if opts.verbose else logging.WARNING,
        format=f"[rank {opts.rank}] %(levelname)s %(name)s: %(message)s",
    )
    from .driver import run  # noqa: PLC0415
    from .formation import measure  # noqa: PLC0415

    return run(opts, measure)


if __name__ == "__main__":
    sys.exit(main())
