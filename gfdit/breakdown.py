"""Where a denoising step's time goes: host time, device busy fraction, device time by kind.

    gfdit profile --model flux-dev --sizes 256,512,1024 --degrees 1 --breakdown OUT   # OUT.json, OUT.md

Note [Step breakdown]
~~~~~~~~~~~~~~~~~~~~~
For one (size, SP degree) the group [0..d-1] runs `steps` denoising steps (after warm-up) twice:
  1. timed: wall time per step, and host time per step = the time until `denoise` returns WITHOUT waiting
     for the device (what the Python side costs to issue the step; on CPU the two are the same). A step
     whose host time is close to its wall time is host-bound: the device waits for launches.
  2. under torch.profiler: every device kernel (CUDA) or, on CPU, every top-level operator (the group's
     collectives run as gfcoll custom ops, gfcoll.ops, so they are named), classified by
     name into gemm, attention, collective, copy and other; `busy` is the union of their intervals,
     `idle` the rest of the profiled span. busy_fraction = busy / span.
Ranks that share one GPU time-slice it, so their device times say little about a GPU of their own; their
host times do (bench/results/2026-12-01-h200/step_speed/README.md).
"""

from __future__ import annotations

import re
import time

import torch

__all__ = ["kKinds", "classify", "step_breakdown", "synthetic_cond", "to_markdown"]

kKinds = ("gemm", "attention", "collective", "copy", "other")

# Kernel and operator names, matched case-insensitively, first match wins.
_PATTERNS = (
    ("collective", re.compile(r"nccl|gfcoll|all_?to_?all|all_?gather|all_?reduce|reduce_?scatter|sendrecv")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|cudnn.*mha")),
    ("gemm", re.compile(r"gemm|matmul|nvjet|cutlass|xmma|wgmma|aten::(mm|addmm|bmm|linear|baddbmm)$|cublas")),
    ("copy", re.compile(r"memcpy|memset|aten::(copy_|to|_to_copy|clone|contiguous)$|copy_kernel|cat")),
)


def classify(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_"):
        # Inductor names a fused kernel after every operator in it ("..._rms_norm__scaled_dot_product_..."
        # for the norm and RoPE that feed attention): fused elementwise and reduction work.
        return "other"
    for kind, pat in _PATTERNS:
        if pat.search(n):
            return kind
    return "other"


def synthetic_cond(model, request, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text conditioning of the shapes encode() gives, from a seeded generator: step timing without the
    text encoders loaded (a step's cost does not depend on the embedding values)."""
    cfg = model.transformer.config
    spec = model.preset.sequence_encoder
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=model.device, dtype=model.dtype)

    if model.preset.family == "flux":
        return {"prompt_embeds": rand(1, spec.max_length, cfg.joint_attention_dim),
                "pooled_prompt_embeds": rand(1, cfg.pooled_projection_dim)}  # fmt: skip
    if model.preset.family == "qwen-image":
        # Unpadded embeddings whose length follows the prompt: 128 tokens taken as typical (gfdit.cost).
        t = min(128, spec.max_length)
        out = {"prompt_embeds": rand(1, t, cfg.joint_attention_dim)}
        if model.uses_cfg(request):
            out["negative_prompt_embeds"] = rand(1, t, cfg.joint_attention_dim)
        return out
    out = {"prompt_embeds": rand(1, spec.max_length, cfg.text_dim)}
    if model.uses_cfg(request):
        out["negative_prompt_embeds"] = rand(1, spec.max_length, cfg.text_dim)
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _events(prof, device: torch.device) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of device kernels (CUDA) or top-level CPU operators (CPU)."""
    evs = prof.events()
    out = []
    if device.type == "cuda":
        for e in evs:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.time_range.start, e.time_range.end))
    else:
        # Top level: operators not inside another operator of the same thread.
        ops = sorted(
            (
                e
                for e in evs
                if e.device_type == torch.autograd.DeviceType.CPU
                and e.name.startswith(("aten::", "gfcoll::"))
            ),
            key=lambda e: (e.thread, e.time_range.start, -e.time_range.end),
        )
        end_by_thread: dict[int, float] = {}
        for e in ops:
            if e.time_range.start >= end_by_thread.get(e.thread, float("-inf")):
                out.append((e.name, e.time_range.start, e.time_range.end))
                end_by_thread[e.thread] = e.time_range.end
    return out


def step_breakdown(
    model, request, cond, x_local, token_range, group=None, steps: int = 3, warmup: int = 1, start: int = 0
) -> dict:
    """Note [Step breakdown] for this rank (a member of `group`, or alone). Every member calls it with the
    same arguments. Runs steps [start, start + warmup + 2 * steps) of the request. Returns milliseconds
    per step."""
    device = model.device
    lo, hi = token_range
    if group is not None:
        from gfcoll.ops import traceable

        # The collectives as gfcoll custom ops (as in compiled steps), so the profiler names them on CPU
        # too; this adds their dispatch (~10 us a call) to an eager step's host time.
        group = traceable(group)
    total = start + warmup + 2 * steps
    if request.num_inference_steps < total:
        raise ValueError(
            f"step_breakdown: the request needs >= {total} steps, has {request.num_inference_steps}"
        )
    x = model.denoise(x_local, (lo, hi), cond, start, start + warmup, request, group=group)
    warmup += start
    _barrier(group, device)
    t0 = time.perf_counter()
    y = model.denoise(x, (lo, hi), cond, warmup, warmup + steps, request, group=group)
    host = time.perf_counter() - t0
    _sync(device)
    wall = time.perf_counter() - t0
    _barrier(group, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t1 = time.perf_counter()
        model.denoise(y, (lo, hi), cond, warmup + steps, warmup + 2 * steps, request, group=group)
        _sync(device)
        prof_wall = time.perf_counter() - t1
    events = _events(prof, device)
    by_kind = dict.fromkeys(kKinds, 0.0)
    per_name: dict[str, float] = {}
    for name, a, b in events:
        by_kind[classify(name)] += b - a
        per_name[name] = per_name.get(name, 0.0) + (b - a)
    if events:
        span_us = max(b for _, _, b in events) - min(a for _, a, _ in events)
        busy_us = _union([(a, b) for _, a, b in events])
    else:
        span_us = busy_us = 0.0
    span_us = max(span_us, prof_wall * 1e6 if device.type == "cpu" else span_us)
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:12]
    ms = 1e-3 / steps  # microseconds in total -> milliseconds per step
    return {
        "width": request.width,
        "height": request.height,
        "frames": request.num_frames,
        "degree": 1 if group is None else group.size,
        "member": 0 if group is None else group.rank,
        "tokens_local": hi - lo,
        "compile": getattr(model, "compile_mode", "off"),
        "cuda_graphs": model.step_graphs is not None,
        "wall_ms": wall * 1e3 / steps,
        "host_ms": host * 1e3 / steps,
        "host_fraction": host / wall if wall > 0 else 0.0,
        "profiled_wall_ms": prof_wall * 1e3 / steps,
        "device_busy_ms": busy_us * ms,
        "device_busy_fraction": busy_us / span_us if span_us > 0 else 0.0,
        "device_ms_by_kind": {k: v * ms for k, v in by_kind.items()},
        "idle_ms": max(0.0, span_us - busy_us) * ms,
        "num_kernels_per_step": len(events) / steps,
        "top": [{"name": n[:120], "ms_per_step": v * ms, "kind": classify(n)} for n, v in top],
    }


def _barrier(group, device) -> None:
    _sync(device)
    if group is not None:
        g = getattr(group, "group", group)
        g.barrier()


def to_markdown(rows: list[dict], title: str = "Per-step breakdown") -> str:
    head = ["size", "SP", "member", "compile", "graphs", "wall ms", "host ms", "host/wall", "busy",
            *[f"{k} ms" for k in kKinds], "idle ms", "kernels"]  # fmt: skip
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size = f"{r['width']}x{r['height']}" + (f"x{r['frames']}" if r.get("frames") else "")
        cells = [size, str(r["degree"]), str(r["member"]), r["compile"], "on" if r["cuda_graphs"] else "off",
                 f"{r['wall_ms']:.2f}", f"{r['host_ms']:.2f}", f"{r['host_fraction']:.2f}",
                 f"{r['device_busy_fraction']:.2f}", *[f"{r['device_ms_by_kind'][k]:.2f}" for k in kKinds],
                 f"{r['idle_ms']:.2f}", f"{r['num_kernels_per_step']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Times per denoising step. host: until `denoise` returned without waiting for the device; "
                 "busy: union of device kernel intervals / profiled span (CPU: top-level operators).")  # fmt: skip
    return "\n".join(lines) + "\n"
