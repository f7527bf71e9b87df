"""Measure a model's task times on this machine and write them as a cost profile.

    gfdit profile --nproc 4 --model flux-dev --sizes 512,1024,2048 --degrees 1,2,4 --out flux-h100.json
    gfdit profile --nproc 1 --model flux-dev --sizes 512,1024 --batch-sizes 1,2,4 --out flux-batch.json
    gfdit profile --nproc 4 --model wan2.1-1.3b --sizes 480 --frames 81 --cfg --out wan-cfg.json
    gfdit profile --nproc 1 --model wan2.2-ti2v-5b --sizes 1280x704 --frames 121 --out ti2v.json
    torchrun --nproc-per-node 4 -m gfdit.profile --model flux-dev ... --out flux-h100.json   # the same

Every rank loads the model. Rank 0 times ENCODE (text encoders and initial noise) and DECODE (VAE,
one rank) per size; for each size and degree d the group [0..d-1] denoises `--steps` steps after a
warm-up step (a step's time is the slowest member's; the median is kept). The profile is a list of
observations in the cost model's terms (Note [Cost model] in gfdit.cost):

    {"format": "gfdit-profile/1", "model": ..., "card": ..., "world_size": ..., "observations": [
        {"kind": "DENOISE", "width": 1024, "height": 1024, "frames": null, "degree": 2, "seconds": 0.157},
        ...],
     "batch_observations": [   (only with --batch-sizes beyond 1)
        {"kind": "DENOISE", "width": 512, "height": 512, "frames": null, "degree": 1, "batch": 4,
         "seconds": 0.21}, ...],
     "cfg_observations": [     (only with --cfg)
        {"kind": "DENOISE", "width": 480, "height": 480, "frames": 81, "degree": 2, "half_degree": 1,
         "seconds": 0.35}, ...],
     "memory": {"model_gib": 31.2, "peak_steps": [   (CUDA only: GiB allocated per rank, the largest rank's)
        {"width": 1024, "height": 1024, "frames": null, "degree": 1, "peak_gib": 33.0}, ...]}}
    (DENOISE: seconds per step, for batch_observations per step of the whole batch; other kinds:
    seconds per task). Batched steps (Note [Batched steps] in gfdit/models/batch.py) run `batch`
requests of one size with different seeds and prompts together; their rows live under their own key so
that a reader that does not know them reads the rest of the profile unchanged. `memory` says what a
rank holds: `model_gib` once the model is loaded (all its components), `peak_gib` the peak allocation
while a size and degree denoised (model included; PyTorch's allocator, not counting its cache). With --cfg, a model
with true classifier-free guidance also times CFG-parallel steps (Note [CFG-parallel] in
gfdit/models/base.py) on 2k ranks for every profiled degree k with 2k <= the world size: halves
[0..k-1] (conditional) and [k..2k-1], rank i of each paired; `degree` is the group (2k).

`gfdit serve --cost-profile FILE` and `gfdit tune --cost-profile FILE` load it into the analytic cost
model (`apply_profile`): measured keys are estimated from the measurement, others from the analytic
formula scaled by the measured/analytic factor of their kind; batched steps the same way with the
per-batch-size factor of Note [Batched step cost] in gfdit.cost, and CFG-parallel steps as the
estimates of their keys (Note [CFG-parallel step cost]).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone

import torch

__all__ = [
    "kFormat",
    "step_times",
    "batch_step_times",
    "cfg_step_times",
    "stage_times",
    "breakdown",
    "read_profile",
    "apply_profile",
    "main",
]

from gfdit.cost import apply_profile, kProfileFormat, read_profile

kFormat = kProfileFormat  # the format this command writes (gfdit.cost reads it)


def cuda_sync(world) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


def sync(world) -> None:
    cuda_sync(world)
    world.group(list(range(world.size))).barrier()


def max_over_world(world, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float32, device=world.device)
    world.group(list(range(world.size))).all_reduce(t, op="max")
    return float(t.item())


def _request(model, width: int, height: int, frames: int | None, steps: int, rid: str):
    from gfdit.request import Request

    return Request(rid, model.preset.name, "a photo of a lighthouse at dusk", width=width, height=height,
                   num_frames=frames, num_inference_steps=steps, seed=1)  # fmt: skip


def step_times(
    world, model, width: int, height: int, degree: int, steps: int, frames: int | None = None
) -> dict:
    """Collective: seconds per denoising step on the group [0..degree-1] (median over `steps` steps
    after one warm-up; each step's time the slowest member's). The other ranks wait."""
    req = _request(model, width, height, frames, steps + 1, f"p{width}x{height}-{degree}")
    ranks = list(range(degree))
    member = world.rank in ranks
    cond = model.encode(req) if member else None
    full = model.init_latents(req).to(world.device)
    seq = full.shape[1]
    per = []
    if member:
        idx = ranks.index(world.rank)
        lo, hi = idx * seq // degree, (idx + 1) * seq // degree
        x = full[:, lo:hi].contiguous()
        group = world.group(ranks) if degree > 1 else None
    for step in range(steps + 1):
        sync(world)
        t0 = time.perf_counter()
        if member:
            x = model.denoise(x, (lo, hi), cond, step, step + 1, req, group=group)
            cuda_sync(world)
        dt = max_over_world(world, time.perf_counter() - t0 if member else 0.0)
        if step > 0:
            per.append(dt)
    return {"width": width, "height": height, "frames": frames, "degree": degree, "tokens": seq,
            "step_s": statistics.median(per), "samples_s": per}  # fmt: skip


def batch_step_times(
    world, model, width: int, height: int, degree: int, batch: int, steps: int, frames: int | None = None
) -> dict:
    """Collective: seconds per batched denoising step of `batch` requests of this size (different seeds
    and prompts) on the group [0..degree-1], as step_times (median over `steps` steps after one warm-up,
    the slowest member's). The other ranks wait."""
    from gfdit.models.batch import BatchItem

    reqs = [_request(model, width, height, frames, steps + 1, f"b{width}x{height}-{degree}-{batch}-{k}")
            for k in range(batch)]  # fmt: skip
    reqs = [replace(r, seed=1 + k, prompt=f"{r.prompt} #{k}") for k, r in enumerate(reqs)]
    ranks = list(range(degree))
    member = world.rank in ranks
    xs, conds = [], []
    per = []
    if member:
        idx = ranks.index(world.rank)
        for r in reqs:
            full = model.init_latents(r).to(world.device)
            seq = full.shape[1]
            lo, hi = idx * seq // degree, (idx + 1) * seq // degree
            xs.append(full[:, lo:hi].contiguous())
            conds.append(model.encode(r))
        group = world.group(ranks) if degree > 1 else None
    for step in range(steps + 1):
        sync(world)
        t0 = time.perf_counter()
        if member:
            items = [BatchItem(r, x, c, step, step + 1) for r, x, c in zip(reqs, xs, conds, strict=True)]
            xs = model.denoise_batch(items, (lo, hi), group)
            cuda_sync(world)
        dt = max_over_world(world, time.perf_counter() - t0 if member else 0.0)
        if step > 0:
            per.append(dt)
    return {"width": width, "height": height, "frames": frames, "degree": degree, "batch": batch,
            "step_s": statistics.median(per), "samples_s": per}  # fmt: skip


def cfg_step_times(
    world, model, width: int, height: int, half_degree: int, steps: int, frames: int | None = None
) -> dict:
    """Collective: seconds per CFG-parallel denoising step on 2 x `half_degree` ranks (halves [0..k-1]
    and [k..2k-1], rank i of each paired; Note [CFG-parallel] in gfdit/models/base.py), as step_times
    (median over `steps` steps after one warm-up, the slowest member's). The other ranks wait."""
    req = _request(model, width, height, frames, steps + 1, f"c{width}x{height}-{half_degree}")
    if not model.uses_cfg(req):
        raise ValueError(
            f"{model.preset.name} runs no true classifier-free guidance: nothing to time CFG-parallel"
        )
    k = half_degree
    ranks = list(range(2 * k))
    member = world.rank in ranks
    per = []
    if member:
        cond = model.encode(req)
        full = model.init_latents(req).to(world.device)
        seq = full.shape[1]
        i = world.rank % k
        half = ranks[:k] if world.rank < k else ranks[k:]
        lo, hi = i * seq // k, (i + 1) * seq // k
        x = full[:, lo:hi].contiguous()
        group = world.group(half) if k > 1 else None
        pair = world.group([i, k + i])
    for step in range(steps + 1):
        sync(world)
        t0 = time.perf_counter()
        if member:
            x = model.denoise(x, (lo, hi), cond, step, step + 1, req, group=group, cfg_group=pair)
            cuda_sync(world)
        dt = max_over_world(world, time.perf_counter() - t0 if member else 0.0)
        if step > 0:
            per.append(dt)
    return {"width": width, "height": height, "frames": frames, "half_degree": k,
            "step_s": statistics.median(per), "samples_s": per}  # fmt: skip


def breakdown(
    world, model, width: int, height: int, degree: int, steps: int, frames: int | None = None
) -> dict | None:
    """Collective: Note [Step breakdown] (gfdit.breakdown) of the group [0..degree-1]; rank 0's row
    (None elsewhere). The other ranks wait."""
    from gfdit.breakdown import step_breakdown

    req = _request(model, width, height, frames, 1 + 2 * steps, f"b{width}x{height}-{degree}")
    ranks = list(range(degree))
    row = None
    sync(world)
    if world.rank in ranks:
        cond = model.encode(req)
        full = model.init_latents(req).to(world.device)
        idx, seq = ranks.index(world.rank), full.shape[1]
        lo, hi = idx * seq // degree, (idx + 1) * seq // degree
        group = world.group(ranks) if degree > 1 else None
        x = full[:, lo:hi].contiguous()
        row = step_breakdown(model, req, cond, x, (lo, hi), group, steps=steps, warmup=1)
    sync(world)
    return row if world.rank == 0 else None


def _write_breakdown(prefix: str, profile: dict, rows: list[dict]) -> None:
    from gfdit.breakdown import to_markdown

    env = {k: profile[k] for k in ("model", "card", "world_size", "dtype", "torch", "date", "command",
                                   "compile", "cuda_graphs")}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
    with open(prefix + ".md", "w") as f:
        f.write(
            to_markdown(rows, f"Per-step breakdown, {env['model']}, {env['card']}, world {env['world_size']}")
        )
        f.write(f"\ncommand: `{env['command']}`; date {env['date']}\n")
    _say(f"wrote the breakdown of {len(rows)} size x degree cases to {prefix}.json and {prefix}.md")


def stage_times(model, width: int, height: int, frames: int | None, reps: int) -> dict:
    """This rank alone: median seconds of ENCODE (text + initial noise) and DECODE (VAE) after a warm-up."""
    req = _request(model, width, height, frames, 2, f"s{width}x{height}")
    device = model.device

    def timed(fn) -> float:
        fn()  # warm-up
        out = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    latents = model.init_latents(req)
    encode_s = timed(lambda: (model.encode(req), model.init_latents(req)))
    decode_s = timed(lambda: model.decode(latents, req))
    return {"width": width, "height": height, "frames": frames, "encode_s": encode_s, "decode_s": decode_s}


# -- reading and applying ----------------------------------------------------------------------------


# -- the command ----------------------------------------------------------------------------------------


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what}: expected integers separated by commas, got {text!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected positive integers, got {text!r}")
    return out


def _sizes(text: str) -> list[tuple[int, int]]:
    """`--sizes`: SIZE (square) or WIDTHxHEIGHT, comma-separated."""
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        parts = tok.lower().split("x")
        try:
            dims = [int(x) for x in parts]
        except ValueError:
            dims = []
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"--sizes: expected SIZE or WIDTHxHEIGHT (positive integers) separated by commas, got {tok!r}"
            )
        out.append((dims[0], dims[-1]))
    if not out:
        raise argparse.ArgumentTypeError(f"--sizes: no size in {text!r}")
    return out


def _gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 3)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model preset, e.g. flux-dev")
    p.add_argument("--sizes", type=_sizes, default=[(512, 512), (1024, 1024)],
                   help="image sizes in pixels, SIZE (square) or WIDTHxHEIGHT, comma-separated "
                   "(default 512,1024)")  # fmt: skip
    p.add_argument("--frames", type=int, default=None, help="video frames (video models)")
    p.add_argument("--degrees", type=lambda t: _ints(t, "--degrees"), default=None,
                   help="SP degrees to time (default 1, 2, 4, ... up to the world size)")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="timed steps per size and degree (default 3)")
    p.add_argument("--batch-sizes", type=lambda t: _ints(t, "--batch-sizes"), default=[1],
                   help="also time batched steps of these many requests together per size and degree "
                   "(Note [Batched steps]; default 1: no batched steps)")  # fmt: skip
    p.add_argument("--cfg", action="store_true",
                   help="also time CFG-parallel steps on 2k ranks for each profiled degree k (models with "
                   "true classifier-free guidance: Wan, Wan2.2, Qwen-Image)")  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed ENCODE/DECODE repetitions (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--weights", default=None, help="local diffusers-layout directory (default: random)")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--breakdown", default=None, metavar="PREFIX",
                   help="also write the per-step breakdown of every size x degree (gfdit.breakdown; rank 0, "
                   "member 0 of each group) to PREFIX.json and PREFIX.md")  # fmt: skip
    from gfdit.fast_options import add_arguments as add_fast_arguments

    add_fast_arguments(p)  # --compile, --cuda-graphs, --graph-memory-gib, --warm-sizes
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from gfdit.models.presets import get_preset

    try:
        preset = get_preset(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    if args.steps < 1 or args.reps < 1:
        parser.error("--steps and --reps must be >= 1")
    if args.frames is not None and not preset.is_video:
        parser.error(f"--frames: {args.model} is an image model")
    if args.cfg and not preset.uses_cfg:
        parser.error(f"--cfg: {args.model} runs no true classifier-free guidance (nothing runs CFG-parallel)")
    from gfdit.fast_options import check_arguments, fast_kwargs

    check_arguments(parser, args)
    from gfdit.models import load_model
    from gfdit.runtime.bootstrap import init_world
    from gfdit.runtime.fast import apply as apply_fast_steps

    world = init_world(args.device)
    try:
        model = load_model(args.model, device=world.device, weights=args.weights)
        fast = apply_fast_steps(model, **fast_kwargs(args))
        breakdown_rows: list[dict] = []
        degrees = args.degrees or [d for d in (1, 2, 4, 8, 16) if d <= world.size]
        rows: list[dict] = []
        batch_rows: list[dict] = []
        cfg_rows: list[dict] = []
        memory: list[dict] = []
        on_cuda = world.device.type == "cuda"
        model_gib = (
            round(max_over_world(world, _gib(torch.cuda.memory_allocated(world.device))), 3)
            if on_cuda
            else None
        )
        for width, height in args.sizes:
            req = _request(model, width, height, args.frames, 2, "check")
            valid = set(model.valid_sp_degrees(req, world.size))
            if world.rank == 0:
                st = stage_times(model, width, height, args.frames, args.reps)
                rows += [_obs("ENCODE", width, height, args.frames, 1, st["encode_s"]),
                         _obs("DECODE", width, height, args.frames, 1, st["decode_s"])]  # fmt: skip
                _say(f"{args.model} {width}x{height}: encode {st['encode_s'] * 1e3:.1f} ms, "
                     f"decode {st['decode_s'] * 1e3:.1f} ms")  # fmt: skip
            for d in degrees:
                if d > world.size or d not in valid:
                    continue
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(world.device)
                r = step_times(world, model, width, height, d, args.steps, args.frames)
                rows.append(_obs("DENOISE", width, height, args.frames, d, r["step_s"]))
                if on_cuda:
                    peak = round(
                        max_over_world(world, _gib(torch.cuda.max_memory_allocated(world.device))), 3
                    )
                    memory.append({"width": width, "height": height, "frames": args.frames, "degree": d,
                                   "peak_gib": peak})  # fmt: skip
                if args.breakdown:
                    b = breakdown(world, model, width, height, d, args.steps, args.frames)
                    if b is not None:
                        breakdown_rows.append(b)
                if world.rank == 0:
                    _say(
                        f"{args.model} {width}x{height} ({r['tokens']} tokens) SP{d}: {r['step_s'] * 1e3:.1f} ms/step"
                        + (f", peak {memory[-1]['peak_gib']} GiB per rank" if on_cuda else "")
                    )
                for b in args.batch_sizes:
                    if b == 1:
                        continue
                    rb = batch_step_times(world, model, width, height, d, b, args.steps, args.frames)
                    batch_rows.append(
                        {**_obs("DENOISE", width, height, args.frames, d, rb["step_s"]), "batch": b}
                    )
                    if world.rank == 0:
                        _say(f"{args.model} {width}x{height} SP{d} batch {b}: {rb['step_s'] * 1e3:.1f} ms/step "
                             f"({rb['step_s'] / r['step_s']:.2f}x one request's step)")  # fmt: skip
                if args.cfg and 2 * d <= world.size:
                    rc = cfg_step_times(world, model, width, height, d, args.steps, args.frames)
                    cfg_rows.append(
                        {**_obs("DENOISE", width, height, args.frames, 2 * d, rc["step_s"]), "half_degree": d}
                    )
                    if world.rank == 0:
                        _say(f"{args.model} {width}x{height} CFG-parallel 2x{d}: {rc['step_s'] * 1e3:.1f} ms/step "
                             f"(plain SP{d}: {r['step_s'] * 1e3:.1f})")  # fmt: skip
        if world.rank == 0:
            device = world.device
            data = {
                "format": kFormat,
                "model": args.model,
                "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "world_size": world.size,
                "dtype": str(model.dtype),
                "torch": torch.__version__,
                "gfcoll_transports": world.transports(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["gfdit profile", *(argv if argv is not None else sys.argv[1:])]),
                "compile": fast.compile,
                "cuda_graphs": fast.cuda_graphs,
                "observations": rows,
            }
            if batch_rows:
                data["batch_observations"] = batch_rows
            if cfg_rows:
                data["cfg_observations"] = cfg_rows
            if on_cuda:
                data["memory"] = {"model_gib": model_gib, "peak_steps": memory}
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(data, f, indent=2)
            _say(f"wrote {len(rows)} observations ({len(batch_rows)} batched, {len(cfg_rows)} CFG-parallel) "
                 f"to {args.out}")  # fmt: skip
            if args.breakdown:
                _write_breakdown(args.breakdown, data, breakdown_rows)
        sync(world)
    finally:
        world.close()
    return 0


def _obs(kind: str, width: int, height: int, frames: int | None, degree: int, seconds: float) -> dict:
    return {
        "kind": kind,
        "width": width,
        "height": height,
        "frames": frames,
        "degree": degree,
        "seconds": seconds,
    }


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
