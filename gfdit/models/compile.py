"""torch.compile of a model's denoising step: `--compile off|regional|full`.

Note [Compiled steps]
~~~~~~~~~~~~~~~~~~~~~
- regional: every repeated transformer block is compiled (Flux: the double- and single-stream blocks,
  each block class once; Qwen-Image: its double-stream blocks; Wan: the block function of
  gfdit.models.sp used for every block, of both experts for Wan2.2 A14B). Dynamo keeps one compiled
  graph per block class and input shapes, shared by all blocks of that class: parameters are graph
  inputs (inline_inbuilt_nn_modules), not constants. The code between blocks (embeddings,
  RoPE tables, final norm) stays eager. Compiling costs seconds per block class, not per block.
- full: the whole transformer forward is compiled (graph breaks allowed; fewer kernels, longer compile).
- off: eager.
Under sequence parallelism the attention processors see the group as a gfcoll.ops.TracedGroup (Note
[Traceable groups] in gfcoll/ops.py): the gfcoll collectives are custom operators, so a block traces
as one graph, specialised on (input shapes, group size, member index) only — a new group of the same
size with the same member index reuses the compiled code. The input shapes include the batch size (the
number of requests stepped together, Note [Batched steps] in gfdit/models/batch.py; Wan with CFG doubles
the rows), so each batch size is its own specialisation, like each image size; `warm(...,
batch_sizes=...)` compiles them ahead.

Shapes. With `dynamic=False` (the default on CUDA: static shapes give inductor's best kernels) every
new (size, degree, member index) compiles on first use; `warm(...)` compiles given sizes at start-up
(SP1, on this rank alone). With `dynamic=None` dynamo compiles the first shape statically and on the
second recompiles with symbolic sizes, which later shapes reuse (the CPU default: fewest compilations).
The recompile limit is raised to kRecompileLimit so that a server seeing many shapes keeps compiling
instead of falling back to eager after dynamo's default 8.

Numerics. Eager bf16 rounds every op's result to bf16; inductor, fusing a chain of ops into one
kernel, keeps the intermediates in fp32, so a compiled step lands elsewhere than eager (by more than
the issue's 1e-2 relative L2 on random weights: flux-dev 1.27e-2..1.32e-2, wan2.1-1.3b 5.84e-2, one
step's velocity, H100). compile_model turns on inductor's `emulate_precision_casts` (the fused kernels
round where eager would) unless TORCHINDUCTOR_EMULATE_PRECISION_CASTS is set: measured side by side
on one H100 (bench/compile_numerics.sh, bench/results/2026-12-06-h100-s8) it brings flux-dev to
5.16e-3..5.21e-3 and wan2.1-1.3b to 2.14e-2 of eager at the same step time (flux 23.3 / 40.2 / 130.1
vs 23.2 / 40.2 / 130.0 ms at 256² / 512² / 1024²; wan 1036.3 vs 1032.3 ms at 832x480x81). It is a
process-wide inductor setting.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from gfdit.fast_options import kModes  # the mode names' one home (no torch: used by --help)

__all__ = ["kModes", "kRecompileLimit", "default_mode", "compile_model", "warm"]

log = logging.getLogger("gfdit.compile")

# Per compiled code object: sizes x SP degrees x member indices x batch sizes a server may see
# (4 x 4 x 8 x 4 = 512).
kRecompileLimit = 512


def default_mode(device: torch.device | str) -> str:
    """regional on CUDA, off on CPU (inductor's CPU compile of a full-size model takes minutes)."""
    return "regional" if torch.device(device).type == "cuda" else "off"


def _eager_numerics() -> None:
    """Note [Compiled steps], "Numerics": fused low-precision ops round as eager does, unless the
    user set TORCHINDUCTOR_EMULATE_PRECISION_CASTS themselves."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415 - only where something compiles

    if "TORCHINDUCTOR_EMULATE_PRECISION_CASTS" not in os.environ:
        inductor_config.emulate_precision_casts = True


def _raise_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < kRecompileLimit:
            setattr(cfg, name, kRecompileLimit)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * kRecompileLimit)


def compile_model(model, mode: str, *, dynamic: bool | None = False) -> None:
    """Put the compiled step on `model` (a DiTModel with its transformer loaded) in place. Compilation
    itself happens on the first step of each shape (or in warm()). Idempotent for the same mode; a model
    compiled once cannot change mode."""
    if mode not in kModes:
        raise ValueError(f"compile mode must be one of {', '.join(kModes)}, got {mode!r}")
    current = getattr(model, "compile_mode", "off")
    if current == mode:
        return
    if current != "off":
        raise ValueError(f"model already compiled with mode {current!r}; cannot switch to {mode!r}")
    if mode == "off":
        return
    model.require("transformer")
    _raise_limits()
    _eager_numerics()
    t = model.transformer
    family = model.preset.family
    if family == "flux":
        if mode == "regional":
            for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
                block.compile(fullgraph=True, dynamic=dynamic)
        else:
            t.compile(dynamic=dynamic)
    elif family == "qwen-image":
        if mode == "regional":
            for block in t.transformer_blocks:
                block.compile(fullgraph=True, dynamic=dynamic)
        else:
            t.compile(dynamic=dynamic)
    elif family in ("wan", "wan2.2"):
        from gfdit.models import sp

        if mode == "regional":
            block_fn = torch.compile(sp.wan_block, fullgraph=True, dynamic=dynamic)
            # Wan2.2 A14B: both experts share the compiled block function.
            for expert in (t, getattr(model, "transformer_2", None)):
                if expert is not None:
                    expert.gfdit_block_fn = block_fn
        else:
            model.wan_forward_fn = torch.compile(sp.wan_forward, dynamic=dynamic)
    else:
        raise ValueError(f"compile: unknown model family {family!r}")
    model.compile_mode = mode
    log.info("%s: compile mode %s (dynamic=%s)", model.preset.name, mode, dynamic)


def warm(model, sizes, *, frames: int | None = None, steps: int = 1, batch_sizes=(1,)) -> list[dict]:
    """Compile (and run once; with step graphs: capture) the step for each size (pixels: an int for a
    square, or (width, height)) and each batch size (1: denoise(); B > 1: denoise_batch() of B requests,
    Note [Batched steps]) on this rank alone (SP1); returns [{"width", "height", "frames", "batch",
    "seconds"}] and logs each. Collective-free: any rank may call it."""
    from gfdit.request import Request

    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"warm: batch sizes must be positive integers, got {batch_sizes!r}")
    out = []
    for size in sizes:
        w, h = (size, size) if isinstance(size, int) else size
        for batch in batch_sizes:
            reqs = [
                Request(
                    f"warm-{w}x{h}-{k}",
                    model.preset.name,
                    "warm-up",
                    width=w,
                    height=h,
                    num_frames=frames,
                    num_inference_steps=max(steps, 1),
                    seed=k,
                )  # fmt: skip
                for k in range(batch)
            ]
            model.validate(reqs[0])
            if "text" in model.components:
                conds = [model.encode(r) for r in reqs]
            else:
                from gfdit.breakdown import synthetic_cond

                conds = [synthetic_cond(model, r) for r in reqs]
            xs = [model.init_latents(r) for r in reqs]
            n = xs[0].shape[1]
            t0 = time.perf_counter()
            if batch == 1:
                model.denoise(xs[0], (0, n), conds[0], 0, 1, reqs[0])
            else:
                from gfdit.models.batch import BatchItem

                items = [BatchItem(r, x, c, 0, 1) for r, x, c in zip(reqs, xs, conds, strict=True)]
                model.denoise_batch(items, (0, n))
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            dt = time.perf_counter() - t0
            log.info("%s: warmed %dx%d%s batch %d (SP1, compile %s) in %.1f s", model.preset.name, w, h,
                     f"x{frames}" if frames else "", batch, getattr(model, "compile_mode", "off"), dt)  # fmt: skip
            out.append({"width": w, "height": h, "frames": frames, "batch": batch, "seconds": dt})
    return out
