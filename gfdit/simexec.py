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
    fixed at dispatch: a first-order model of processor sharing). With `sharing` (measured (k,
    slowdown) points: k one-rank processes computing at once on the cores, each's step time over
    one alone's; bench/fidelity_concurrency.py) the slowdown of k busy is s(k), interpolated
    between the points and proportional to k beyond the last, instead of the ideal max(1, k / cores):
    the task computes s(b) / s(d) times slower. On the 2-core development machine 4 processes run
    2.2-2.7 times slower each, not 2 (bench/results/2026-12-06-cpu/fidelity2/README.md);
  - host work on the shared cores (CPU runs, with `cores` > 0): the HTTP front end, the engine's
    control thread (rank 0's process, beside rank 0's worker) and the replaying client compute too.
    Each request costs `host_cpu_s` CPU-seconds of it (or its shape's entry in `host_cpu_by_size`),
    charged half when its ENCODE is dispatched (the request parsed, admitted and scheduled) and half
    when its DECODE is (the result encoded as PNG, sent and parsed). What was charged in the last
    `host_window_s` seconds, divided by that window, is the host's load u in cores (at most
    `cores`), and a task dispatched with b ranks busy computes max(1, (b + u) / cores) / max(1, d /
    cores) times slower. `gfdit eval fidelity --calibrate-overhead` measures the per-request CPU on
    the idle server (gfdit.eval.fidelity.measured_host_cpu); the window is a smoothing choice, not
    a calibrated constant (tasks last milliseconds, requests tenths of seconds).
  - result delivery: a request's result reaches its client `result_s` after its last task ends (the
    image encoded, the HTTP answer sent and parsed; 7-16 ms a request on the 2-core CPU server, from
    its task log: gfdit.eval.tasks). It occupies no rank; with `cores` > 0 it is CPU work on the
    shared cores like the tasks, so it stretches by s(b + u) / s(1) with b ranks busy and host load u
    when the last task ends. `gfdit eval fidelity --calibrate-overhead` measures it on the idle server:
    a lone request's latency at the client less the server's own (gfdit.eval.fidelity.calibrated_result_s);
  - compute scale: every task's compute is `compute_scale` times the cost model's (a profile that is
    slower than the server, as the idle server's lone requests show: gfdit.eval.fidelity.calibrated_scale).
`ExecutionModel()` (all off) is the plain simulator. `ExecutionState.batch_timing` prices a batched
DENOISE chunk (several requests' chunks as one command on one group, Note [Batched step cost] in
gfdit.cost).
"""

from __future__ import annotations

import math
from collections import deque
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
    host_cpu_s: float = 0.0  # CPU-seconds of host work per request on the shared cores (with cores > 0)
    # (width, height, CPU-seconds) per request shape, overriding host_cpu_s for requests of that shape
    host_cpu_by_size: tuple[tuple[int, int, float], ...] = ()
    host_window_s: float = 1.0  # host work charged in this trailing window / its length = the host load
    compute_scale: float = 1.0  # every task's compute times this (the lone-request calibration's)
    result_s: float = 0.0  # seconds from a request's last task to its result at the client
    # measured (k, slowdown) of k one-rank processes on the shared cores; () = ideal max(1, k / cores)
    sharing: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        # JSON round trips (fidelity.json's "execution") turn the tuples into lists
        points = tuple(sorted((float(k), float(v)) for k, v in self.sharing))
        object.__setattr__(self, "sharing", points)
        for k, v in points:
            if not (k > 0 and v > 0 and math.isfinite(k) and math.isfinite(v)):
                raise ValueError(f"sharing points must be (k > 0, slowdown > 0), got {(k, v)}")
        if len({k for k, _ in points}) != len(points):
            raise ValueError(f"sharing names a process count twice: {points}")
        table = tuple((int(w), int(h), float(s)) for w, h, s in self.host_cpu_by_size)
        object.__setattr__(self, "host_cpu_by_size", table)
        for s in (self.host_cpu_s, *(s for _, _, s in table)):
            if not (s >= 0 and math.isfinite(s)):
                raise ValueError(f"host CPU seconds per request must be >= 0, got {s}")
        if len({(w, h) for w, h, _ in table}) != len(table):
            raise ValueError(f"host_cpu_by_size names a size twice: {table}")
        if not (self.compute_scale > 0 and math.isfinite(self.compute_scale)):
            raise ValueError(f"compute_scale must be > 0, got {self.compute_scale}")
        if not (self.host_window_s > 0 and math.isfinite(self.host_window_s)):
            raise ValueError(f"host_window_s must be > 0, got {self.host_window_s}")
        if not (self.result_s >= 0 and math.isfinite(self.result_s)):
            raise ValueError(f"result_s must be >= 0, got {self.result_s}")
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

    def slowdown(self, k: float) -> float:
        """How much slower each of `k` busy processes computes on the shared cores than one alone
        (Note [Simulated execution]); 1 without shared cores."""
        if self.cores <= 0:
            return 1.0
        if not self.sharing:
            return max(1.0, k / self.cores)
        pts = self.sharing
        if k <= pts[0][0]:
            return pts[0][1]
        for (k0, v0), (k1, v1) in zip(pts, pts[1:], strict=False):
            if k <= k1:
                return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
        return pts[-1][1] * k / pts[-1][0]

    def request_host_cpu_s(self, request: Request) -> float:
        """CPU-seconds of host work that `request` costs (Note [Simulated execution])."""
        for w, h, s in self.host_cpu_by_size:
            if (w, h) == (request.width, request.height):
                return s
        return self.host_cpu_s

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
    host_charges: deque = field(default_factory=deque)  # (time, CPU-seconds) of host work, oldest first
    host_charged_s: float = 0.0  # the sum of host_charges' CPU-seconds

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
        if a.task.kind in (TaskKind.ENCODE, TaskKind.DECODE):
            self._charge_host(0.5 * m.request_host_cpu_s(request), now)
        return self._dispatch(ranks, senders, reshard_s, compute_s, now)

    def _charge_host(self, cpu_s: float, now: float) -> None:
        if self.model.cores > 0 and cpu_s > 0:
            self.host_charges.append((now, cpu_s))
            self.host_charged_s += cpu_s

    def host_load(self, now: float) -> float:
        """The host's load in cores at `now`: CPU-seconds charged in the trailing window / window."""
        m = self.model
        while self.host_charges and self.host_charges[0][0] <= now - m.host_window_s:
            self.host_charged_s -= self.host_charges.popleft()[1]
        if not self.host_charges:
            self.host_charged_s = 0.0  # no float residue
        return min(float(m.cores), max(0.0, self.host_charged_s) / m.host_window_s)

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
        compute_s *= m.compute_scale
        if m.cores > 0:
            busy = {x for x, t in self.rank_busy_until.items() if t > now} | set(ranks)
            load = len(busy) + self.host_load(now)
            compute_s *= m.slowdown(load) / m.slowdown(len(ranks))
        start = now
        if m.busy_senders:
            start = max([start, *(self.rank_free_s.get(x, now) for x in set(ranks) | senders)])
            for x in senders - set(ranks):
                self.rank_free_s[x] = start + reshard_s  # its next command waits for the send
        for x in ranks:
            self.rank_busy_until[x] = start + reshard_s + compute_s + m.host_overhead_s
        return start, reshard_s, compute_s + m.host_overhead_s

    def result_delay(self, now: float) -> float:
        """Seconds from a request's last task ending at `now` to its result at the client (Note
        [Simulated execution], result delivery)."""
        m = self.model
        if m.result_s <= 0 or m.cores <= 0:
            return m.result_s
        busy = sum(1 for t in self.rank_busy_until.values() if t > now)
        return m.result_s * m.slowdown(busy + 1 + self.host_load(now)) / m.slowdown(1)

    def finished(self, ranks: Iterable[int], end_s: float) -> None:
        for x in ranks:
            self.rank_free_s[x] = max(self.rank_free_s.get(x, end_s), end_s)
