"""How the simulator turns a dispatched task into time, the way the engine and the workers run it.

Note [Simulated execution]
~~~~~~~~~~~~~~~~~~~~~~~~~~
`gfdit.sim.simulate` charges a task its reshard plus its task time from a cost model. An
`ExecutionModel` adds what the server really does around that (gfdit.runtime.engine and
gfdit.runtime.worker, Note [Reshard execution]):
  - host overhead: every task costs `host_overhead_s` more (the engine's command over ZeroMQ, the
    worker's report back and the engine's poll, the device syncs around the task);
  - reshard cost: `reshard_latency_s + bytes / reshard_bandwidth` instead of the cost model's
    assumption (H100 defaults: a line through the measured 0.07 ms for 0.19 MiB and 0.18 ms for 4 MiB,
    bench/results/2026-11-27-h100/README.md);
  - busy senders: every rank named in the command (the group, the latent's old holders and the
    text-conditioning holders that send) starts it only after what it was given before; a sender
    outside the group that is still running another request's task delays the task, and its own next
    task waits for the send (commands run in arrival order on each rank);
  - text-conditioning copies: members that do not hold the request's text embeddings receive them
    (bytes from the model preset's text encoders) with the reshard;
  - decode placement: DECODE gathers the latent onto ranks[0], which alone decodes, so it
    costs the one-rank decode plus the gather, whatever the degree;
  - shared CPU cores (CPU runs only): with `cores` > 0 the ranks are processes sharing that many
    cores, so a task on d ranks dispatched while b ranks (its own included) are busy computes
    max(1, b / cores) / max(1, d / cores) times slower: its cost-model time, profiled with its own d
    ranks busy and the others idle, already holds its own group's share of the cores (the slowdown is
    fixed at dispatch: a first-order model of processor sharing).
`ExecutionModel()` (all off) is the plain simulator. `ExecutionState.batch_timing` prices a batched
DENOISE chunk (several requests' chunks as one command on one group, Note [Batched step cost] in
gfdit.cost).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gfdit.cost import CostModel, get_profile, state_bytes_per_index, state_dim_size
from gfdit.policy import Assignment
from gfdit.request import Request
from gfdit.tasks import TaskKind

__all__ = [
    "ExecutionModel",
    "ExecutionState",
    "cond_bytes",
    "kH100ReshardLatencyS",
    "kH100ReshardBandwidth",
]

# A line through the two ends of the H100 migration measurements (0.19 MiB: 0.07 ms; 4 MiB: 0.18 ms).
kH100ReshardBandwidth = (4.0 - 0.19) * 2**20 / (0.18e-3 - 0.07e-3)  # bytes/s (~36 GB/s)
kH100ReshardLatencyS = 0.07e-3 - 0.19 * 2**20 / kH100ReshardBandwidth  # ~65 us


def cond_bytes(request: Request) -> int:
    """Bytes of a request's text conditioning as the worker holds it: per text encoder of the model
    preset, its embedding ([max_length, d_model] for sequence encoders, [hidden] pooled) in the
    preset's dtype; twice with classifier-free guidance (negative prompt). 0 for unknown presets."""
    from gfdit.models.presets import get_preset

    try:
        p = get_preset(request.model)
    except ValueError:
        return 0
    itemsize = 2 if p.default_dtype == "bfloat16" else 4
    total = 0
    for e in p.text_encoders:
        cfg = e.config.get("text_config", e.config)  # Qwen2.5-VL nests its language model's config
        width = int(cfg.get("d_model", cfg.get("projection_dim", cfg.get("hidden_size", 0))))
        total += (e.max_length if e.role == "sequence" else 1) * width * itemsize
    return total * (2 if p.uses_cfg else 1)


@dataclass(frozen=True)
class ExecutionModel:
    """Note [Simulated execution]. Every field off by default (the plain simulator)."""

    host_overhead_s: float = 0.0  # seconds added to every task (engine <-> worker round trip, syncs)
    reshard_latency_s: float | None = None  # per reshard; None: the true cost model's reshard_time
    reshard_bandwidth: float | None = None  # bytes/s of reshards, cond copies and DECODE's gather
    busy_senders: bool = False  # a command starts when every rank it names has finished what came before
    cond_copies: bool = False  # members lacking the text conditioning receive it with the reshard
    decode_on_first_rank: bool = False  # DECODE = gather to ranks[0] + one-rank decode there
    cores: int = 0  # CPU cores the ranks share; 0: each rank has its own device (no sharing)

    def __post_init__(self) -> None:
        if not (self.host_overhead_s >= 0 and math.isfinite(self.host_overhead_s)):
            raise ValueError(f"host_overhead_s must be >= 0, got {self.host_overhead_s}")
        if (self.reshard_latency_s is None) != (self.reshard_bandwidth is None):
            raise ValueError("give both reshard_latency_s and reshard_bandwidth, or neither")
        if self.reshard_bandwidth is not None and not self.reshard_bandwidth > 0:
            raise ValueError(f"reshard_bandwidth must be > 0, got {self.reshard_bandwidth}")
        if not (isinstance(self.cores, int) and self.cores >= 0):
            raise ValueError(f"cores must be an integer >= 0, got {self.cores!r}")
        if self.reshard_latency_s is not None and not self.reshard_latency_s >= 0:
            raise ValueError(f"reshard_latency_s must be >= 0, got {self.reshard_latency_s}")

    @classmethod
    def worker(
        cls, host_overhead_s: float, reshard_latency_s: float, reshard_bandwidth: float
    ) -> ExecutionModel:
        """Everything on: the server as gfdit.runtime runs it."""
        return cls(host_overhead_s, reshard_latency_s, reshard_bandwidth, True, True, True)

    def move_time(self, truth: CostModel, num_bytes: float) -> float:
        """Seconds to move `num_bytes` between ranks (0 for nothing)."""
        if num_bytes <= 0:
            return 0.0
        if self.reshard_bandwidth is None:
            return truth.reshard_time(int(num_bytes))
        assert self.reshard_latency_s is not None
        return self.reshard_latency_s + num_bytes / self.reshard_bandwidth

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass
class ExecutionState:
    """What an ExecutionModel tracks during one simulation."""

    model: ExecutionModel
    truth: CostModel
    rank_free_s: dict[int, float] = field(default_factory=dict)  # rank -> when it finishes its queue
    cond_holders: dict[str, set[int]] = field(default_factory=dict)  # request -> ranks with its cond
    rank_busy_until: dict[int, float] = field(default_factory=dict)  # rank -> end of its task in flight

    def timing(self, a: Assignment, request: Request, now: float) -> tuple[float, float, float]:
        """(start, reshard seconds, compute seconds) of assignment `a` dispatched at `now`."""
        m, truth = self.model, self.truth
        ranks = tuple(a.ranks)
        num_bytes, senders = self._moves(a, request, ranks)
        reshard_s = m.move_time(truth, num_bytes)
        if m.decode_on_first_rank and a.task.kind is TaskKind.DECODE:
            r = request
            compute_s = truth.stage_time(TaskKind.DECODE, r.model, r.width, r.height, r.num_frames, 1)
            if len(ranks) > 1:
                latent = state_dim_size(r) * get_profile(r.model).state_bytes_per_token
                compute_s += m.move_time(truth, latent * (len(ranks) - 1) / len(ranks))
        else:
            compute_s = truth.task_time(a.task, request, len(ranks), cfg=a.cfg)
        return self._dispatch(ranks, senders, reshard_s, compute_s, now)

    def batch_timing(
        self, members: Sequence[tuple[Assignment, Request]], now: float
    ) -> tuple[float, float, float]:
        """(start, reshard seconds, compute seconds) of a batched DENOISE chunk dispatched at `now`
        (Note [Batched steps] in gfdit/models/batch.py): every member's DENOISE assignment on the same
        group, requests of one model and shape. Each member's state and text conditioning move as for
        a task alone (one reshard for all); the compute is the cost model's batched chunk
        (CostModel.batch_chunk_time: members may run different step counts); the host overhead is paid
        once, for the one command of the batch."""
        if not members:
            raise ValueError("batch_timing: no members")
        ranks = tuple(members[0][0].ranks)
        r0 = members[0][1]
        ids = [r.request_id for _, r in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"batch_timing: a request appears twice: {ids}")
        for a, r in members:
            if a.task.kind is not TaskKind.DENOISE:
                raise ValueError(f"batch_timing: only DENOISE chunks are batched, got {a.task.kind.name}")
            if tuple(a.ranks) != ranks:
                raise ValueError(f"batch_timing: members on different groups {ranks} and {tuple(a.ranks)}")
            if (r.model, r.width, r.height, r.num_frames) != (r0.model, r0.width, r0.height, r0.num_frames):
                raise ValueError(
                    f"batch_timing: {r.request_id!r} ({r.model} {r.width}x{r.height}) cannot be batched "
                    f"with {r0.request_id!r} ({r0.model} {r0.width}x{r0.height})"
                )
        num_bytes, senders = 0.0, set()
        for a, r in members:
            b, s = self._moves(a, r, ranks)
            num_bytes += b
            senders |= s
        reshard_s = self.model.move_time(self.truth, num_bytes)
        steps = [a.task.num_steps for a, _ in members]
        compute_s = self.truth.batch_chunk_time(
            r0.model, r0.width, r0.height, r0.num_frames, len(ranks), steps
        )
        return self._dispatch(ranks, senders, reshard_s, compute_s, now)

    def _moves(self, a: Assignment, request: Request, ranks: tuple[int, ...]) -> tuple[float, set[int]]:
        """Bytes that move before assignment `a` runs (its reshard, text-conditioning copies) and the
        ranks that send them; records the new text-conditioning holders."""
        m, rid = self.model, request.request_id
        num_bytes = a.reshard.bytes_moved(state_bytes_per_index(request, a.task.kind)) if a.reshard else 0
        senders: set[int] = set()
        if a.reshard is not None and not a.reshard.is_noop:
            senders |= {t.src_rank for t in a.reshard.transfers}
        if m.cond_copies and a.task.kind in (TaskKind.DENOISE, TaskKind.DECODE):
            holders = self.cond_holders.setdefault(rid, set())
            lacking = [r for r in ranks if r not in holders]
            if lacking and holders:
                inside = [h for h in ranks if h in holders]
                pool = inside or sorted(holders)
                senders |= {pool[i % len(pool)] for i in range(len(lacking))}
                num_bytes += cond_bytes(request) * len(lacking)
                holders |= set(lacking)
        if a.task.kind is TaskKind.ENCODE:
            self.cond_holders[rid] = set(ranks)
        return num_bytes, senders

    def _dispatch(
        self, ranks: tuple[int, ...], senders: set[int], reshard_s: float, compute_s: float, now: float
    ) -> tuple[float, float, float]:
        m = self.model
        if m.cores > 0:
            busy = {x for x, t in self.rank_busy_until.items() if t > now} | set(ranks)
            compute_s *= max(1.0, len(busy) / m.cores) / max(1.0, len(ranks) / m.cores)
        start = now
        if m.busy_senders:
            start = max([now, *(self.rank_free_s.get(x, now) for x in set(ranks) | senders)])
            for x in senders - set(ranks):
                self.rank_free_s[x] = start + reshard_s  # its next command waits for the send
        for x in ranks:
            self.rank_busy_until[x] = start + reshard_s + compute_s + m.host_overhead_s
        return start, reshard_s, compute_s + m.host_overhead_s

    def finished(self, ranks: Iterable[int], end_s: float) -> None:
        for x in ranks:
            self.rank_free_s[x] = max(self.rank_free_s.get(x, end_s), end_s)
