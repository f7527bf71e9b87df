"""CUDA-graph replay of denoising steps (`--cuda-graphs on|off`).

Note [Step graphs]
~~~~~~~~~~~~~~~~~~
An eager step of a full-size DiT costs ~55 ms of host time on an H200 however small the image (kernel
launches; DESIGN.md section 2), so small steps are host-bound. `StepGraphs` captures the transformer
forward of one step (DiTModel.velocity: the forward, and Wan's CFG combination) as a CUDA graph and
replays it; the scheduler's Euler update stays eager (a few elementwise kernels whose Python bookkeeping
is not capturable).

- Key (`step_key`): (model, compile mode, batch size, every input tensor's shape and dtype, the
  non-tensor inputs, the SP group's key). The batch size is the number of requests stepped together
  (Note [Batched steps] in gfdit/models/batch.py; 1 for a request alone): it is in the tensor shapes
  too, and named on its own so that the key says it and stats can count graphs per batch size. The
  group key is (size, member index) plus, where the transport's captured kernels name the peers (nccl:
  the rank list is baked into the captured sends and receives), the exact ranks: `group_key()` is the
  one place that decides, and the hook for group-agnostic transports (the ipc transport's graph slots
  key by size and member index alone).
- Inputs are copied into static buffers owned by the entry, then the graph replays; the output tensor
  is the graph's own and is valid until that graph replays again (callers consume it at once).
- Collective matching: on a miss the step runs eagerly ONCE (which also compiles, under torch.compile)
  and is then captured (capture records, it does not execute), and the eager result is returned; on a hit
  the graph replays once. Either way each member executes the step's collectives exactly once, so
  members whose caches differ (different eviction histories) still match.
- Memory: each entry's cost is the allocator's reserved-memory growth over its capture plus its static
  buffers; least recently used entries are evicted to keep the total under `max_bytes` and the count
  under `max_graphs`. `stats()` feeds /metrics.
- A capture that fails (an operation that cannot be captured) marks its key as eager-only with a logged
  reason; the step's eager result is used (the fast path "can't run", the caller falls back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StepGraphs", "group_key", "step_key", "kDefaultMaxBytes", "kDefaultMaxGraphs"]

log = logging.getLogger("gfdit.graphs")

# A full-size Flux step's graph holds ~1-3 GiB of activations at 1024² (its intermediates live in the
# graph's private pool); 16 GiB keeps a handful of sizes x degrees beside an 24 GiB model on an 80 GiB card.
kDefaultMaxBytes = 16 << 30
kDefaultMaxGraphs = 64


def group_key(group) -> tuple:
    """What a captured step depends on of its SP group: () for no group; (size, member index, ranks) on
    transports whose captured kernels name the peers (nccl, the only CUDA transport today).
    Hook: a group-agnostic transport (ipc graph slots: world.graph_slot(size), slot.bind(group)) returns
    (size, member index) here, so one graph serves every group of that size."""
    if group is None:
        return ()
    g = getattr(group, "group", group)  # a gfcoll.ops.TracedGroup wraps the Group
    return (g.size, g.rank, tuple(g.ranks))


def _flatten(obj, path: str, tensors: list, consts: list) -> None:
    if isinstance(obj, torch.Tensor):
        tensors.append((path, obj))
    elif isinstance(obj, dict):
        for k in sorted(obj):
            _flatten(obj[k], f"{path}.{k}", tensors, consts)
    elif isinstance(obj, tuple | list):
        for i, v in enumerate(obj):
            _flatten(v, f"{path}[{i}]", tensors, consts)
    elif obj is None or isinstance(obj, bool | int | float | str):
        consts.append((path, obj))
    else:
        consts.append((path, ("group",) + group_key(obj)))


def step_key(model, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> tuple:
    """The cache key of one step (Note [Step graphs]): (id(model), compile mode, batch size = x.shape[0],
    (path, shape, dtype, device) of every tensor input, the non-tensor inputs, group_key(group)).
    Pure bookkeeping (no CUDA): two steps share a graph exactly when their keys are equal."""
    tensors: list = []
    consts: list = []
    _flatten({"x": x, "t": t, "ctx": ctx}, "", tensors, consts)
    return _key(model, x, tensors, consts, group)


def _key(model, x: torch.Tensor, tensors: list, consts: list, group) -> tuple:
    return (
        id(model),
        getattr(model, "compile_mode", "off"),
        int(x.shape[0]),
        tuple((p, tuple(v.shape), v.dtype, v.device) for p, v in tensors),
        tuple(consts),
        group_key(group),
    )


def _restore(obj, static: dict[str, torch.Tensor], path: str):
    """obj with every tensor replaced by its static buffer (same structure)."""
    if isinstance(obj, torch.Tensor):
        return static[path]
    if isinstance(obj, dict):
        return {k: _restore(v, static, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_restore(v, static, f"{path}[{i}]") for i, v in enumerate(obj))
    return obj


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static: dict[str, torch.Tensor]  # path -> static input buffer
    out: torch.Tensor  # the graph's output
    nbytes: int
    replays: int = 0


class StepGraphs:
    """Per-rank cache of captured steps (Note [Step graphs]). Not thread-safe for concurrent steps (the
    worker runs one task at a time); stats() may be called from any thread."""

    def __init__(
        self, device: torch.device, max_bytes: int = kDefaultMaxBytes, max_graphs: int = kDefaultMaxGraphs
    ):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if max_bytes <= 0 or max_graphs <= 0:
            raise ValueError(f"max_bytes and max_graphs must be > 0, got {max_bytes}, {max_graphs}")
        self.device = torch.device(device)
        self.max_bytes = int(max_bytes)
        self.max_graphs = int(max_graphs)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._eager_only: dict[tuple, str] = {}
        self._stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()
        self.captures = 0
        self.evictions = 0
        self.capture_s = 0.0

    # -- the step ------------------------------------------------------------------------------------
    def velocity(self, model, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        """model.velocity(x, t, ctx, group), replayed from a graph when one is cached."""
        inputs = {"x": x, "t": t, "ctx": ctx}
        tensors: list = []
        consts: list = []
        _flatten(inputs, "", tensors, consts)
        key = _key(model, x, tensors, consts, group)  # = step_key(model, x, t, ctx, group)
        entry = self._entries.get(key)
        if entry is not None:
            for p, v in tensors:
                entry.static[p].copy_(v, non_blocking=True)
            entry.graph.replay()
            entry.replays += 1
            with self._lock:
                self._entries.move_to_end(key)
            return entry.out
        if key in self._eager_only:
            return model.velocity(x, t, ctx, group)
        return self._capture(key, model, inputs, tensors, group)

    def _capture(self, key, model, inputs, tensors, group) -> torch.Tensor:
        t0 = time.perf_counter()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        static = {p: v.clone() for p, v in tensors}
        s_inputs = _restore(inputs, static, "")
        args = (s_inputs["x"], s_inputs["t"], s_inputs["ctx"], group)
        result = model.velocity(*args)  # the step's one execution (compiles if needed)
        self._evict(reserve=True)
        # torch.cuda.graph synchronises and empties the allocator's cache on entry (once per capture,
        # never on a replay); doing it first makes the reserved-memory growth the graph's own pool.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                out = model.velocity(*args)
        except Exception as e:  # a step that cannot be captured: run it eagerly from now on
            reason = f"{type(e).__name__}: {e}"
            self._eager_only[key] = reason
            log.warning("CUDA graph capture failed (%s); this step shape runs eagerly", reason)
            return result
        nbytes = max(0, torch.cuda.memory_reserved(self.device) - before)
        nbytes += sum(v.numel() * v.element_size() for v in static.values())
        with self._lock:
            self._entries[key] = _Entry(graph, static, out, nbytes)
            self.captures += 1
            self.capture_s += time.perf_counter() - t0
        self._evict(reserve=False)
        log.info("captured a step graph (%s tokens, group %s): %.1f MiB, %.2f s; %d graphs, %.1f MiB",
                 tuple(inputs["x"].shape), group_key(group), nbytes / 2**20, time.perf_counter() - t0,
                 len(self._entries), self.nbytes() / 2**20)  # fmt: skip
        return result

    def _evict(self, reserve: bool) -> None:
        """Drop least recently used entries: below the bounds, or (reserve) with room for one more."""
        with self._lock:
            limit = self.max_graphs - 1 if reserve else self.max_graphs
            while self._entries and (len(self._entries) > limit or self._nbytes() > self.max_bytes):
                key, entry = self._entries.popitem(last=False)
                entry.graph.reset()
                self.evictions += 1
                log.info("evicted a step graph (%.1f MiB, %d replays)", entry.nbytes / 2**20, entry.replays)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            for e in self._entries.values():
                e.graph.reset()
            self._entries.clear()

    def batch_sizes(self) -> dict[int, int]:
        """Cached graphs per batch size (the key's third field)."""
        with self._lock:
            out: dict[int, int] = {}
            for key in self._entries:
                out[key[2]] = out.get(key[2], 0) + 1
            return out

    def stats(self) -> dict[str, float]:
        """{"graphs", "bytes", "captures", "evictions", "eager_only", "capture_s"} of this rank."""
        with self._lock:
            return {
                "graphs": len(self._entries),
                "bytes": self._nbytes(),
                "captures": self.captures,
                "evictions": self.evictions,
                "eager_only": len(self._eager_only),
                "capture_s": self.capture_s,
            }
