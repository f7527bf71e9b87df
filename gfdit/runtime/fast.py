"""Applies the fast-step options (gfdit.fast_options) to a loaded model: compile, CUDA graphs, warm-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gfdit.models.compile import compile_model, default_mode, kModes, warm

__all__ = ["FastSteps", "apply", "graph_pool_stats"]

log = logging.getLogger("gfdit.fast")


@dataclass
class FastSteps:
    """What `apply` set up on a model (rank-local)."""

    compile: str  # "off", "regional" or "full"
    cuda_graphs: bool  # steps replayed from CUDA graphs
    warm: list[dict]  # per warmed size and batch size: {"width", "height", "frames", "batch", "seconds"}
    setup_s: float  # seconds apply() took (compilation of the warm sizes included)


def apply(
    model,
    *,
    compile: str | None = None,
    cuda_graphs: bool | None = None,
    warm_sizes=(),
    graph_memory_bytes: int | None = None,
    warm_batch_sizes=None,
) -> FastSteps:
    """Compile `model`'s step and attach a StepGraphs (CUDA), then warm the given sizes, each at every
    batch size of `warm_batch_sizes` (None: 1). `compile` None: default_mode(device); `cuda_graphs`
    None: on with CUDA. On CPU cuda_graphs is ignored (logged)."""
    from gfdit.runtime.graphs import StepGraphs, kDefaultMaxBytes

    t0 = time.perf_counter()
    device = model.device
    mode = default_mode(device) if compile is None else compile
    if mode not in kModes:
        raise ValueError(f"compile must be one of {', '.join(kModes)}, got {mode!r}")
    graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
    if graphs and device.type != "cuda":
        log.info("CUDA graphs requested on %s: ignored (CPU steps run without graphs)", device)
        graphs = False
    # Static shapes on CUDA (inductor's best kernels); dynamic on CPU (fewest compilations).
    compile_model(model, mode, dynamic=False if device.type == "cuda" else None)
    if graphs:
        model.step_graphs = StepGraphs(device, max_bytes=graph_memory_bytes or kDefaultMaxBytes)
    sizes = list(warm_sizes)
    warmed = []
    batches = list(warm_batch_sizes) if warm_batch_sizes else [1]
    for w, h, f in sizes:
        warmed += warm(model, [(w, h)], frames=f, batch_sizes=batches)
    setup = time.perf_counter() - t0
    if mode != "off" or graphs:
        log.info("%s: fast steps (compile %s, CUDA graphs %s): %d warm sizes x batch sizes %s in %.1f s",
                 model.preset.name, mode, "on" if graphs else "off", len(sizes), batches, setup)  # fmt: skip
    return FastSteps(mode, graphs, warmed, setup)


def graph_pool_stats(model) -> dict[str, float]:
    """This rank's step-graph pool (zeros without one)."""
    g = getattr(model, "step_graphs", None)
    if g is None:
        return {"graphs": 0, "bytes": 0, "captures": 0, "evictions": 0, "eager_only": 0, "capture_s": 0.0}
    return g.stats()
