"""Batched denoising: several requests of one model and shape step together through one forward.

Note [Batched steps]
~~~~~~~~~~~~~~~~~~~~
`denoise_batch(model, items, group)` runs the denoising steps of B requests (`BatchItem`s) of the same
model and token grid as one batch on one group: the transformer sees [B, S/d, C_tok], one row per
request, each row at its own timestep (per-sample timesteps: Flux and Wan embed the timestep per
sample) with its own text conditioning and guidance (Flux: the distilled guidance embedding per row;
Wan: classifier-free guidance rows, below). Everything else stays per request:
  - each request has its own FlowMatch scheduler (its own step count, sigmas, flow shift), positioned
    at its own step index; the Euler update is elementwise on that request's rows only;
  - the latents come in and go out as one separate [1, S/d, C_tok] tensor per request (never a shared
    batch buffer), so at the next chunk boundary a request can leave the batch, run alone, join another
    batch or move to another group;
  - seeds are per request: the initial noise is init_latents(request), as for a request alone.
Item i runs steps [start_i, end_i). Chunks of different lengths are allowed: iteration j runs the items
with start_i + j < end_i, so the batch shrinks as members finish (each new active set is a new batch
size, with its own step graph under --cuda-graphs).

Wan's classifier-free guidance: the transformer rows are [cond_0 .. cond_{B-1}, uncond_k for every item
k that uses CFG, in batch order] (a request alone with CFG: [cond, uncond], as before), and item k's
velocity is uncond_k + g_k (cond_k - uncond_k). The policy keeps a batch's members in one CFG mode
(issue 16), which is the case the layout is simplest for (all or none); mixed modes are also correct.

Sequence parallelism: the batch dimension passes through the Ulysses processors unchanged (their
all-to-alls move [N, B, S/d, H, D] blocks; Note [Ulysses over a gfcoll group] in gfdit/models/sp.py).
Every member of the group calls denoise_batch with the same items in the same order (same requests,
conditioning, start, end), each holding its own token slice of every request.

Equality: row r of a batched forward computes the same per-token arithmetic as the request alone, so
a batched request equals its solo run up to the floating-point differences of batched matrix
products (fp32 on CPU: tests/unit/test_batch_denoise.py and tests/multiproc/test_batch_sp.py check
<= 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchItem", "denoise_batch", "batch_shape_key"]


@dataclass
class BatchItem:
    """One request's part of a batched chunk."""

    request: Any  # the gfdit.request.Request (same model and token grid as the other items)
    latents_local: torch.Tensor  # [1, hi - lo, C_tok]: this rank's slice of the request's latent
    cond: Mapping[str, torch.Tensor]  # encode(request)
    start: int  # first step to run (0 <= start <= end <= num_inference_steps)
    end: int  # one past the last step to run


def batch_shape_key(model, request) -> tuple:
    """What requests must share to be batched on `model`: the model and the packed token grid
    (frames, rows, columns). Guidance, seeds, step counts and step indices may differ."""
    return (model.preset.name, *model.token_grid(request))


def _check(model, items: Sequence[BatchItem], token_range: tuple[int, int], group) -> tuple[int, int]:
    if not items:
        raise ValueError("denoise_batch: no items")
    ids = [it.request.request_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"denoise_batch: a request appears twice in the batch: {ids}")
    key = batch_shape_key(model, items[0].request)
    for it in items:
        if it.request.model != model.preset.name:
            raise ValueError(
                f"denoise_batch: request {it.request.request_id!r} is for {it.request.model!r}, "
                f"this model is {model.preset.name!r}"
            )
        other = batch_shape_key(model, it.request)
        if other != key:
            raise ValueError(
                f"denoise_batch: requests of different shapes cannot be batched: token grid {key[1:]} "
                f"({items[0].request.request_id!r}) vs {other[1:]} ({it.request.request_id!r})"
            )
        steps = it.request.num_inference_steps
        if not 0 <= it.start <= it.end <= steps:
            raise ValueError(
                f"denoise_batch: request {it.request.request_id!r} needs 0 <= start <= end <= {steps}, "
                f"got start={it.start}, end={it.end}"
            )
    n, d = model.check_slice(items[0].request, token_range, group, "denoise_batch")
    for it in items:
        if tuple(it.latents_local.shape) != (1, n, model.token_dim):
            raise ValueError(
                f"denoise_batch: latents of {it.request.request_id!r} have shape "
                f"{tuple(it.latents_local.shape)}, expected (1, {n}, {model.token_dim})"
            )
    return n, d


def denoise_batch(
    model,
    items: Sequence[BatchItem],
    token_range: tuple[int, int],
    group=None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """Note [Batched steps]. Returns the new local slice of every item (fp32, [1, hi - lo, C_tok]), in
    item order; an item with start == end comes back unchanged (as fp32 on this device).

    token_range: (lo, hi), this rank's tokens of every request (the same even split as denoise()).
    group: a gfcoll.Group whose members all call denoise_batch with the same items in the same order;
    None or size 1: this rank holds all tokens. on_step(k, i + 1) is called once item k's step i is
    issued (on CUDA: enqueued, not necessarily finished)."""
    model.require("transformer")
    _, d = _check(model, items, token_range, group)
    xs = [it.latents_local.to(device=model.device, dtype=torch.float32) for it in items]
    schedulers = []
    for it in items:
        sch = model.timesteps(it.request)
        sch.set_begin_index(it.start)
        schedulers.append(sch)
    sp = group if d > 1 else None
    if sp is not None and model.compile_mode != "off":
        from gfcoll.ops import traceable  # noqa: PLC0415 - registers the gfcoll custom ops

        sp = traceable(sp)  # Note [Traceable groups] in gfcoll/ops.py
    graphs = model.step_graphs
    num_iters = max(it.end - it.start for it in items)
    active_prev: tuple[int, ...] | None = None
    ctx: dict[str, Any] = {}
    with torch.no_grad():
        for j in range(num_iters):
            active = tuple(k for k, it in enumerate(items) if it.start + j < it.end)
            if active != active_prev:  # the batch shrank: conditioning of the remaining members
                members = [items[k] for k in active]
                ctx = model.prepare_batch([m.cond for m in members], [m.request for m in members], sp)
                active_prev = active
            x = torch.cat([xs[k] for k in active]) if len(active) > 1 else xs[active[0]]
            ts = [schedulers[k].timesteps[items[k].start + j] for k in active]
            t = torch.stack(ts)
            if graphs is not None:  # Note [Step graphs] in gfdit/runtime/graphs.py (keyed by batch size)
                v = graphs.velocity(model, x, t, ctx, sp)
            else:
                v = model.velocity(x, t, ctx, sp)
            v = v.float()
            for row, k in enumerate(active):
                xs[k] = schedulers[k].step(v[row : row + 1], ts[row], xs[k], return_dict=False)[0]
                if on_step is not None:
                    on_step(k, items[k].start + j + 1)
    return xs
