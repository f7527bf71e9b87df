"""Fast-step options of a serving or profiling process: compile mode, CUDA graphs, warm sizes.

This module imports no torch: `gfdit serve --help` stays fast. gfdit.runtime.fast applies them.

`gfdit serve` and `gfdit profile` share the flags (`add_arguments`, `check_arguments`); the Engine
and gfdit.profile call `apply` on their model after loading it (every rank, before any request).

    --compile off|regional|full   default: regional on CUDA, off on CPU (Note [Compiled steps])
    --cuda-graphs on|off          default: on with CUDA; ignored on CPU (Note [Step graphs])
    --graph-memory-gib G          bound of each rank's step-graph pool (default 16)
    --warm-sizes 512,1024x768,832x480x81   shapes compiled (and, with graphs, captured) at start-up
    --warm-batch-sizes 1,2,4      batch sizes warmed for each warm size (default: 1 to the policy's
                                  max_batch when serving, 1 when profiling; Note [Batched steps])

Warm-up runs one SP1 step per size and batch size on each rank alone, so its compile time is logged at start-up. Other
shapes, and every SP degree > 1 (each (size, degree, member index) is a static-shape compilation), are
compiled on their first step: that request's step pays the compilation (flux-dev on an H200: 9.5–21.9 s
per shape for both block classes, bench/results/2026-12-01-h200/step_speed) and, with CUDA graphs, one
capture (0.1–0.4 s). On CPU dynamic shapes are used instead, so after the second shape no step compiles.
"""

from __future__ import annotations

import argparse

__all__ = ["kModes", "add_arguments", "check_arguments", "parse_sizes", "parse_batch_sizes", "fast_kwargs"]

kModes = ("off", "regional", "full")  # --compile (Note [Compiled steps] in gfdit/models/compile.py)


def parse_sizes(text: str) -> list[tuple[int, int, int | None]]:
    """ "512,1024x768,832x480x81" -> [(512, 512, None), (1024, 768, None), (832, 480, 81)]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            nums = [int(v) for v in part.split("x")]
        except ValueError:
            raise ValueError(f"size {part!r} is not WIDTH[xHEIGHT[xFRAMES]]") from None
        if not 1 <= len(nums) <= 3 or min(nums) < 1:
            raise ValueError(f"size {part!r} is not WIDTH[xHEIGHT[xFRAMES]] of positive integers")
        w = nums[0]
        h = nums[1] if len(nums) > 1 else w
        out.append((w, h, nums[2] if len(nums) > 2 else None))
    return out


def parse_batch_sizes(text: str) -> list[int] | None:
    """ "1,2,4" -> [1, 2, 4]; "" -> None (the default)."""
    if not text.strip():
        return None
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise ValueError(f"batch sizes must be integers >= 1, got {text!r}")
    return sorted(set(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", choices=kModes, default=None,
                   help="torch.compile of the denoising step (default: regional on CUDA, off on CPU)")  # fmt: skip
    p.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                   help="replay denoising steps from CUDA graphs (default: on with CUDA; ignored on CPU)")  # fmt: skip
    p.add_argument("--graph-memory-gib", type=float, default=16.0,
                   help="per-rank bound of the CUDA-graph pool; least recently used graphs are evicted (default 16)")  # fmt: skip
    p.add_argument("--warm-sizes", default="",
                   help="shapes compiled before serving, WIDTH[xHEIGHT[xFRAMES]] comma-separated (SP1); "
                   "others compile on their first step")  # fmt: skip
    p.add_argument("--warm-batch-sizes", default="",
                   help="batch sizes warmed for each warm size, comma-separated (default: 1 to the policy's "
                   "max_batch when serving, 1 when profiling)")  # fmt: skip


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        parse_sizes(args.warm_sizes)
    except ValueError as e:
        parser.error(f"--warm-sizes: {e}")
    try:
        parse_batch_sizes(args.warm_batch_sizes)
    except ValueError as e:
        parser.error(f"--warm-batch-sizes: {e}")
    if not args.graph_memory_gib > 0:
        parser.error(f"--graph-memory-gib must be > 0, got {args.graph_memory_gib}")


def fast_kwargs(args: argparse.Namespace) -> dict:
    """Engine / apply keyword arguments from the parsed flags."""
    return {
        "compile": args.compile,
        "cuda_graphs": None if args.cuda_graphs is None else args.cuda_graphs == "on",
        "warm_sizes": parse_sizes(args.warm_sizes),
        "warm_batch_sizes": parse_batch_sizes(args.warm_batch_sizes),
        "graph_memory_bytes": int(args.graph_memory_gib * (1 << 30)),
    }
