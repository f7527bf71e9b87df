"""Discrete-event simulation of the scheduler: the same Scheduler and Policy objects as the server,
against a cost model on a simulated clock. Used to compare and tune policies before deployment.

Each dispatched task takes `true_cost`'s reshard time for the bytes its plan moves plus its task time
(times a log-normal noise factor if `noise` > 0); its end is reported to the scheduler like a worker
would. Events at the same instant are applied (completions first, then arrivals) before one
`schedule` call.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from gfdit.cost import CostModel, state_bytes_per_index
from gfdit.request import Request, RequestState
from gfdit.scheduler import Scheduler
from gfdit.simexec import ExecutionModel, ExecutionState
from gfdit.tasks import Task, TaskTimings

__all__ = [
    "TraceEntry",
    "RequestOutcome",
    "SimResult",
    "SimulationStalled",
    "simulate",
    "RequestClass",
    "make_workload",
]


class SimulationStalled(RuntimeError):
    """Nothing is running or pending, yet requests are unfinished: the policy left them waiting."""


@dataclass(frozen=True)
class TraceEntry:
    """One simulated task execution."""

    task: Task  # the task as run
    ranks: tuple[int, ...]  # its group
    start_s: float  # dispatch
    end_s: float  # completion
    reshard_s: float  # part of it spent resharding


@dataclass(frozen=True)
class RequestOutcome:
    """How one request ended."""

    request_id: str  # the request
    state: RequestState  # terminal state
    arrival_s: float  # arrival
    finish_s: float  # end (with an execution model's result delivery: the result at its client)
    deadline_s: float | None  # its deadline, if any
    num_reshards: int  # tasks that moved state first
    num_preemptions: int  # times its ranks went to another request while it waited

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def met_deadline(self) -> bool | None:
        if self.deadline_s is None:
            return None
        return self.state is RequestState.DONE and self.finish_s <= self.deadline_s + 1e-9


@dataclass(frozen=True)
class SimResult:
    """Outcome of a simulation."""

    outcomes: dict[str, RequestOutcome]  # by request id
    trace: tuple[TraceEntry, ...]  # every task, in dispatch order
    start_s: float  # first arrival
    end_s: float  # last event

    @property
    def num_done(self) -> int:
        return sum(o.state is RequestState.DONE for o in self.outcomes.values())

    @property
    def throughput_rps(self) -> float:
        """Completed requests per second, first arrival to last event."""
        span = self.end_s - self.start_s
        return self.num_done / span if span > 0 else math.inf

    def latencies(self) -> list[float]:
        """Latencies of the completed requests, ascending."""
        return sorted(o.latency_s for o in self.outcomes.values() if o.state is RequestState.DONE)

    @property
    def mean_latency_s(self) -> float:
        lat = self.latencies()
        return sum(lat) / len(lat) if lat else math.nan

    def latency_percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in [0, 100]) of the completed requests' latencies."""
        lat = self.latencies()
        if not lat:
            return math.nan
        return lat[min(len(lat) - 1, max(0, math.ceil(q / 100 * len(lat)) - 1))]

    @property
    def deadline_attainment(self) -> float:
        """Fraction of the requests with a deadline that completed by it (nan if none had one)."""
        met = [o.met_deadline for o in self.outcomes.values() if o.deadline_s is not None]
        return sum(met) / len(met) if met else math.nan


def simulate(
    scheduler: Scheduler,
    requests: Sequence[Request],
    *,
    true_cost: CostModel | None = None,
    noise: float = 0.0,
    seed: int = 0,
    execution: ExecutionModel | None = None,
) -> SimResult:
    """Run `requests` (submitted at their arrival_s) through `scheduler` to the end and report.

    `true_cost` is what tasks really take (default: the scheduler's own cost model, i.e. perfect
    estimates). `execution` adds the server's own costs (Note [Simulated execution] in gfdit.simexec:
    host overhead, measured reshard costs, busy senders, decode on ranks[0]). Raises SimulationStalled
    if the policy leaves work waiting with nothing in flight.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    truth = true_cost if true_cost is not None else scheduler.cost_model
    rng = random.Random(seed)
    ex = ExecutionState(execution, truth) if execution is not None else None
    seq = itertools.count()
    events: list[tuple] = []  # (time, 0 = completion | 1 = arrival, seq, payload)
    for r in requests:
        heapq.heappush(events, (r.arrival_s, 1, next(seq), r))
    trace: list[TraceEntry] = []
    delivered: dict[
        str, float
    ] = {}  # request -> its result's delivery after its last task (Note [Simulated execution])
    start = min((r.arrival_s for r in requests), default=0.0)
    now = start
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, kind, _, payload = heapq.heappop(events)
            if kind == 1:
                scheduler.submit(payload)
            else:
                entry = payload
                if ex is not None:
                    ex.finished(entry.ranks, now)
                scheduler.on_task_done(
                    entry.task, entry.ranks, TaskTimings(entry.start_s, now, entry.reshard_s)
                )
                rid = entry.task.request_id
                if (
                    ex is not None
                    and scheduler.record(rid).state is RequestState.DONE
                    and rid not in delivered
                ):
                    delivered[rid] = ex.result_delay(now)
        units: dict[object, list] = {}  # a task alone, or the members of one batch (same tag)
        for i, a in enumerate(scheduler.schedule(now)):
            units.setdefault(("alone", i) if a.batch is None else ("batch", a.batch), []).append(a)
        for members in units.values():
            reqs = [scheduler.record(a.task.request_id).request for a in members]
            a, req = members[0], reqs[0]
            begin = now
            if ex is not None and len(members) > 1:  # Note [Batched chunks in the scheduler]
                begin, reshard_s, compute_s = ex.batch_timing(list(zip(members, reqs, strict=True)), now)
            elif ex is not None:
                begin, reshard_s, compute_s = ex.timing(a, req, now)
            else:
                num_bytes = sum(
                    m.reshard.bytes_moved(state_bytes_per_index(r, m.task.kind)) if m.reshard else 0
                    for m, r in zip(members, reqs, strict=True)
                )
                reshard_s = truth.reshard_time(num_bytes)
                if len(members) > 1:
                    steps = [m.task.num_steps for m in members]
                    compute_s = truth.batch_chunk_time(
                        req.model, req.width, req.height, req.num_frames, len(a.ranks), steps
                    )
                else:
                    compute_s = truth.task_time(a.task, req, len(a.ranks), cfg=a.cfg)
            if noise > 0:
                compute_s *= math.exp(rng.gauss(0.0, noise))
            for m in members:
                entry = TraceEntry(m.task, m.ranks, begin, begin + reshard_s + compute_s, reshard_s)
                trace.append(entry)
                heapq.heappush(events, (entry.end_s, 0, next(seq), entry))
    unfinished = [rid for rid, rec in scheduler.records.items() if not rec.state.is_terminal]
    if unfinished:
        raise SimulationStalled(
            f"at t={now:.3f} nothing is in flight but {len(unfinished)} requests are unfinished "
            f"(e.g. {unfinished[:3]}); policy {scheduler.policy.name!r} left them waiting"
        )
    outcomes = {}
    for r in requests:
        rec = scheduler.record(r.request_id)
        assert rec.finish_s is not None
        outcomes[r.request_id] = RequestOutcome(
            r.request_id,
            rec.state,
            r.arrival_s,
            rec.finish_s + delivered.get(r.request_id, 0.0),
            r.deadline_s,
            rec.num_reshards,
            rec.num_preemptions,
        )
    return SimResult(outcomes, tuple(trace), start, max([now, *(o.finish_s for o in outcomes.values())]))


@dataclass(frozen=True)
class RequestClass:
    """A kind of request in a synthetic workload."""

    name: str  # class name, prefix of the request ids
    model: str  # model preset
    width: int  # pixels
    height: int  # pixels
    num_frames: int | None = None  # None for images
    num_inference_steps: int = 28  # denoising steps
    weight: float = 1.0  # relative frequency in the mix


def make_workload(
    classes: Sequence[RequestClass],
    num_requests: int,
    *,
    rate_rps: float,
    alpha: float | None = None,
    cost_model: CostModel | None = None,
    seed: int = 0,
    start_s: float = 0.0,
) -> list[Request]:
    """`num_requests` requests with Poisson arrivals at `rate_rps`, classes drawn by weight. With `alpha`,
    each gets deadline = arrival + alpha * its standalone latency on one rank per `cost_model`."""
    if alpha is not None and cost_model is None:
        raise ValueError("deadlines (alpha) need a cost_model")
    if rate_rps <= 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    rng = random.Random(seed)
    weights = [c.weight for c in classes]
    t = start_s
    out = []
    for i in range(num_requests):
        t += rng.expovariate(rate_rps)
        c = rng.choices(classes, weights)[0]
        r = Request(
            f"{c.name}-{i}", c.model, prompt=f"{c.name} #{i}", width=c.width, height=c.height,
            num_frames=c.num_frames, num_inference_steps=c.num_inference_steps, seed=i, arrival_s=t,
        )  # fmt: skip
        if alpha is not None:
            assert cost_model is not None
            deadline = t + alpha * cost_model.standalone_time(r, 1)
            r = dataclasses.replace(r, deadline_s=deadline)
        out.append(r)
    return out
