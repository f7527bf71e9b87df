"""Scheduling policies: the pluggable decision of which task runs where, on how many ranks.

A `Policy` sees a read-only `SchedulerView` (free ranks, runnable tasks with their request metadata
and cost estimates, running tasks) and returns `Assignment`s. It is called by the `Scheduler` at every
rescheduling point, both in the server and in the simulator (`gfdit.sim`). Contract of `schedule`:
  - every assignment names a task that is in `view.runnable` (as given, `RunnableTask.task`), at most
    one per request;
  - its ranks are free, distinct, in [0, world_size), disjoint from the other assignments' ranks,
    except the members of one batch (same `batch` tag: DENOISE chunks of batchable requests of one
    model and shape, on the same ordered ranks; Note [Batching in policies]);
  - the group size is one of `RunnableTask.valid_degrees`;
  - DENOISE may set `num_steps` (1..remaining_steps) to run more or fewer steps than listed;
  - a runnable request that gets nothing simply waits (preemption): its state stays where it is;
  - it must not mutate the view. The Scheduler validates the output and raises PolicyError otherwise.
Built-ins prefer the ranks that already hold a request's state (`choose_ranks_for_reuse`).
`make_policy("edf-best-fit:chunk=2,max_sp=4")` builds one from a spec string.

Note [Batching in policies]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every built-in policy takes `max_batch` (default DEFAULT_MAX_BATCH = 4; 1: no batching, each chunk
alone, exactly as before batching existed). With max_batch > 1, once the policy has made its
assignments, `batch_denoise` walks them in the policy's order: for each DENOISE chunk not yet in a
batch, of a model that denoises in batches (`gfdit.batching.batchable`: Flux and Wan; never Wan2.2 or
Qwen-Image), it calls `choose_batches` (Note [Choosing batches]) on the runnable DENOISE chunks that
could share its group (same degree valid, and left waiting by the policy: a chunk that it gave ranks of its own runs there in
parallel, which joining a batch could only make later while its ranks idle until the next
rescheduling point: pulled together, 4 requests on 4 free ranks all ran on one rank while three
idled; test_a_chunk_with_ranks_of_its_own_is_not_pulled_into_a_batch) and takes the batch that chunk is in. The other members run with it on its
ranks, under one `Assignment.batch` tag; each keeps its own chunk length (the policy's `chunk`) and its
own reshard onto those ranks. A batched step that fails (not because a peer died) cannot say which
member caused it: every member re-runs from its first task, `solo` (RunnableTask.solo), never to be
batched again, so a faulty request then fails alone and the others complete (gfdit.runtime.engine).
Whether a batch forms, and its size, is the cost model's call: with a
cost model that knows nothing of batching, nothing is ever batched.
Why the default is 4. Batches form only where the cost model says a member saves at least
kMinBatchSaving (15 %) of its chunk alone (Note [Choosing batches]), so the default costs nothing
where batching does not pay. Measured, each time against max_batch=1 on the same trace in one run:
  - one H100, flux-dev 512² and 1024², eager, fcfs-elastic, a load that saturates both servers
    (bench/results/2026-12-06-h100-s7): 1.35x the throughput (1.323 vs 0.982 req/s), P99 latency 25.4
    vs 39.3 s, 2.99 requests per batched chunk, every sampled image within 2/255 of the request alone;
  - the same on the fast path (compiled + CUDA graphs; bench/results/2026-12-06-h100-s8/batching-fast),
    before the margin and graph-replayed steps' cost (Note [Cost model]) existed: the policy batched
    98 % of the chunks on savings the steps did not have (5-7 % per request at 512², none at 1024²)
    and gained 1.03x the throughput for a mean latency 19 % higher. Now the cost model predicts no
    saving for graph-replayed steps and the measured profile one below the margin: those chunks run
    alone, as with max_batch=1;
  - the CPU smoke (tiny-flux, one rank; bench/results/2026-12-06-cpu/batching-smoke): 1.42x.
A larger maximum mostly adds compiled shapes and graphs per size (one per batch size: `gfdit serve`
warms 1..max_batch for every --warm-sizes entry), for savings that flatten by 4 (eager 512²: a third
and fourth member each save 21 %).
Batching and lost ranks: a CPU CI run with 4 as the default (of 9d93cec) once returned a wrong image
after a rank was lost, reproduced once in 10 runs of tests/multiproc/test_survival.py with max_batch=4
(bench/results/2026-12-06-cpu-s7/survival-batched). The cause was gfcoll's host transport, not the
policy: a batch makes one reshard per member, a rank that failed in the first skipped the rest while a
peer went on, their operation counters fell out of step, and the next exchange between the two read a
failed exchange's leftover window (Note [Scoped epochs] in gfcoll/world.py). Workers now scope every
command's operations by its task id; the same copy of the test passed 15 runs of 15
(bench/results/2026-12-06-cpu-s8/survival-batched).

Note [Encoding ahead for batches]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Batching alone only batches chunks that are ready at the same rescheduling point. When a policy serves
requests one after the other (one rank; or FCFS whose head takes every rank), a queued request's next
task is ENCODE, which gets ranks only once the head has finished: at most one request is ever at
DENOISE and nothing batches, however deep the queue. So every built-in policy (in `finish`, after
`batch_denoise`; `encode_ahead`) may run, instead of a batchable DENOISE chunk (alone or a batch, not
CFG-parallel), the ENCODE of one waiting request (next task ENCODE, not given ranks by the policy) of
the same BatchKey, on that chunk's ranks in their order. At the next rescheduling point, when that
ENCODE ends, its DENOISE is ready beside the chunk's and `batch_denoise` batches them. Per decision:
  - one ENCODE per chunk, on the chunk's whole group: a rank runs one task at a time, so one rank can
    take one encode per rescheduling point anyway, and this way the newcomer's state lands sharded
    over the group the batch runs on (no reshard, conditioning on every member; the group that the
    fixed pipelines, static, rssp and tetriserve, then keep for it). The chunk waits (the scheduler
    counts a preemption); the next point decides again, so a batch grows by one member per encode, up
    to max_batch, and refills as members finish;
  - the newcomer is the first waiting request of the key, those that can still meet their deadline
    alone first, then by urgency (deadline, arrival), for which `choose_encode_ahead`
    (gfdit/batching.py) finds, by the cost model, with its first chunk as the policy would run it
    (`chunk`, else the scheduler's `chunk_steps`):
      (2) batching pays: the batched chunk with the newcomer costs less than the batch without it plus
          the newcomer's chunk alone (CostModel.batch_chunk_time), by more than the encode costs the
          group beyond the one rank that would encode the request anyway:
          degree x saved > (degree - 1) x encode seconds (on one rank: saved > 0);
      (3) the delay breaks no deadline: every member (the chunk's and the newcomer) that would meet
          its deadline without the encode-ahead (from now: its chunk alone; the newcomer encoded on
          one rank, then alone) still meets it when the batch starts after the encode, both as
          choose_batches counts it (this chunk batched, the rest of its trajectory alone) and with
          the batch staying together to the end (every member's remaining steps in lockstep, the
          batch shrinking as members finish, then DECODE), which is what refilling makes of it. As in
          Note [Choosing batches], members that miss alone are not protected, and requests outside
          the batch that wait for these ranks are not modelled: in the simulator (tiny-flux 64² and
          128², one rank, edf-best-fit, deadlines at 3x standalone) deadline attainment stays at or
          above the unbatched one up to 1.3x overload, with 23-28 % more throughput there, and
          loses up to 6 points at 1.7x overload, where throughput is 33 % higher.
  - nothing changes with max_batch = 1, for models that do not batch, or when no waiting request
    of the key exists; `disaggregated` opts out while it keeps ENCODE off its denoise ranks, and
    `step-preempt` never makes a chunk with a started non-preemptible member wait (it promises
    never to pause one).
The workers keep each request's state on its ranks, whatever else runs there (gfdit.runtime.worker
holds it by request id), so the waiting chunk resumes where it was.

Note [CFG-parallel in policies]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A request with true classifier-free guidance (`gfdit.models.presets.runs_true_cfg`: Wan, Wan2.2,
Qwen-Image with guidance_scale > 1) may run a DENOISE chunk CFG-parallel (Note [CFG-parallel] in
gfdit/models/base.py): a group of 2k ranks, `Assignment.cfg` set, the first k ranks computing the
conditional prediction with SP degree k, the last k the unconditional one, rank i of each half paired.
The scheduler lists the CFG-parallel step time of such a request per group size 2k
(`RunnableTask.cfg_step_s`, from `CostModel.cfg_step_time`). Every built-in policy takes
`cfg=auto|on|off` (default auto; off for the fixed pipelines `static` and `rssp`) and decides in one place (`cfg_view`, `finish`), whatever its own logic:
  - it schedules on a view in which each group size of such a DENOISE chunk costs what the chosen
    layout at that size costs: `off` plain SP only; `on` CFG-parallel wherever a size allows it;
    `auto` the faster of the two by the cost model (plain SP on a tie). Sizes that only CFG-parallel
    allows (2k where k divides the heads and tokens but 2k does not) become valid degrees of the chunk;
  - its DENOISE assignments at a size whose chosen layout is CFG-parallel get `cfg=True`, their ranks
    ordered so that the most of the state stays in place (each half chosen for reuse in turn);
  - CFG-parallel chunks are never batched (a batch's members share plain SP).
Requests without true CFG (Flux, or guidance_scale <= 1) are untouched: for them `cfg` is ignored.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from gfdit.batching import batchable, choose_batches, choose_encode_ahead
from gfdit.cost import CostModel
from gfdit.layout import Layout, ReshardPlan, choose_ranks_for_reuse
from gfdit.request import Request
from gfdit.tasks import Task, TaskKind

__all__ = [
    "RunnableTask",
    "RunningTask",
    "SchedulerView",
    "Assignment",
    "Policy",
    "PolicySpecError",
    "register_policy",
    "available_policies",
    "make_policy",
    "StaticPolicy",
    "FcfsElasticPolicy",
    "EdfBestFitPolicy",
    "SrtfPolicy",
    "RsspPolicy",
    "TetriServePolicy",
    "StepPreemptPolicy",
    "LoadAdaptivePolicy",
    "SjfPolicy",
    "EdfGreedyPolicy",
    "DisaggregatedPolicy",
    "place",
    "state_holders",
    "batch_denoise",
    "encode_ahead",
    "cfg_view",
    "finish",
    "kCfgModes",
]

kCfgModes = ("auto", "on", "off")  # Note [CFG-parallel in policies]


@dataclass(frozen=True)
class RunnableTask:
    """A request waiting at a rescheduling point, with its next task and estimates."""

    task: Task  # its next task as listed (DENOISE: the scheduler's default chunk)
    request: Request  # the request's metadata
    started: bool  # True once one of its tasks has run (its state then lives on `layout`)
    remaining_steps: int  # denoising steps not yet run
    layout: Layout | None  # where its state lives now; None before ENCODE
    dim_size: int  # size of the split dimension of its state (latent tokens)
    valid_degrees: tuple[int, ...]  # allowed group sizes (ascending, <= world size, includes 1)
    last_ranks: tuple[int, ...]  # ordered group of its last task; () before its first
    runnable_since_s: float  # when it became runnable (arrival or end of its last task)
    task_s: Mapping[int, float]  # degree -> estimated seconds of `task` as listed
    step_s: Mapping[int, float]  # degree -> estimated seconds of one denoising step
    remaining_s: Mapping[int, float]  # degree -> estimated seconds to finish, DENOISE at that degree
    # group size 2k -> estimated seconds of one CFG-parallel denoising step (two halves of k ranks);
    # empty for a request without true CFG (Note [CFG-parallel in policies])
    cfg_step_s: Mapping[int, float] = dataclasses.field(default_factory=dict)
    # never batched: a batch it ran in failed and it re-runs alone (Note [Batching in policies])
    solo: bool = False

    @property
    def request_id(self) -> str:
        return self.task.request_id

    @property
    def kind(self) -> TaskKind:
        return self.task.kind

    @property
    def deadline_s(self) -> float | None:
        return self.request.deadline_s

    def slack_s(self, now_s: float, degree: int) -> float:
        """Seconds to spare if it ran alone from now at `degree` (inf without a deadline)."""
        if self.request.deadline_s is None:
            return math.inf
        return self.request.deadline_s - now_s - self.remaining_s[degree]


@dataclass(frozen=True)
class RunningTask:
    """A task in flight."""

    task: Task  # what runs
    ranks: tuple[int, ...]  # on which ordered group
    started_s: float  # when it was dispatched
    expected_end_s: float  # dispatch time + estimated reshard and task seconds


@dataclass(frozen=True)
class SchedulerView:
    """What a policy sees. Read-only: policies must not mutate it or call `cost.observe`."""

    now_s: float  # the scheduler clock
    world_size: int  # number of ranks
    free_ranks: tuple[int, ...]  # ranks with no task in flight, ascending
    runnable: tuple[RunnableTask, ...]  # requests at a rescheduling point, by arrival
    running: tuple[RunningTask, ...]  # tasks in flight
    cost: CostModel  # for estimates beyond the precomputed ones
    # the scheduler's default DENOISE chunk (Trajectory.chunk_steps): a request's chunk as listed once it
    # reaches DENOISE (Note [Encoding ahead for batches])
    chunk_steps: int


@dataclass(frozen=True)
class Assignment:
    """A decision: run `task` on `ranks`. Policies fill the first three fields."""

    task: Task  # the runnable task (RunnableTask.task); the Scheduler returns the task actually run
    ranks: tuple[int, ...]  # ordered group (see Note [State layout between tasks] in gfdit.scheduler)
    num_steps: int | None = None  # DENOISE: steps to run from task.start; None: as listed; else None
    reshard: ReshardPlan | None = None  # set by the Scheduler: how the state moves onto `ranks`
    # DENOISE: assignments with the same non-None tag run as one batched chunk on the same ranks
    # (Note [Batching in policies]); None: alone
    batch: int | None = None
    # DENOISE: run CFG-parallel, ranks[:k] conditional and ranks[k:] unconditional, k = len(ranks) / 2
    # (Note [CFG-parallel in policies]); False: plain SP over all the ranks
    cfg: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))


class PolicySpecError(ValueError):
    """A policy spec string names an unknown policy or parameter, or a bad value."""


class Policy(abc.ABC):
    """A scheduling policy (see the module docstring for the contract of `schedule`)."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def schedule(self, view: SchedulerView) -> list[Assignment]:
        """Assignments to start now; [] to wait."""

    def spec(self) -> str:
        """The spec string that `make_policy` turns back into an equal policy (registered dataclass
        policies; others return their name)."""
        if not dataclasses.is_dataclass(self):
            return self.name
        params = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}:{params}" if params else self.name


# Helpers shared by the built-ins.


def place(
    rt: RunnableTask, free: Sequence[int], num_ranks: int, avoid: Iterable[int] = ()
) -> tuple[int, ...]:
    """`num_ranks` of `free`, chosen and ordered to keep the most of `rt`'s state in place; among
    equally good choices, ranks in `avoid` (holding other requests' state) are taken last."""
    return tuple(choose_ranks_for_reuse(rt.layout, free, num_ranks, rt.dim_size, avoid))


def state_holders(view: SchedulerView) -> dict[str, set[int]]:
    """request id -> ranks holding its state, for the runnable requests that have state."""
    return {rt.request_id: set(rt.layout.ranks) for rt in view.runnable if rt.layout is not None}


def _others(holders: dict[str, set[int]], request_id: str) -> set[int]:
    return {r for rid, ranks in holders.items() if rid != request_id for r in ranks}


def _steps(rt: RunnableTask, chunk: int | None) -> int | None:
    """DENOISE steps to run: None (chunk None) keeps the task as listed, i.e. the scheduler's
    `chunk_steps`; 0 runs all remaining steps; else at most `chunk`."""
    if rt.kind is not TaskKind.DENOISE or chunk is None:
        return None
    return rt.remaining_steps if chunk == 0 else min(chunk, rt.remaining_steps)


def _fastest_degree(rt: RunnableTask, cap: int, tol: float) -> int:
    """The smallest valid degree <= cap whose step time is within (1 + tol) of the best one."""
    degrees = [d for d in rt.valid_degrees if d <= cap] or [1]
    best = min(rt.step_s[d] for d in degrees)
    return min(d for d in degrees if rt.step_s[d] <= best * (1.0 + tol))


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


DEFAULT_MAX_BATCH = 4  # Note [Batching in policies]: why, and the measurements behind it


def _check_max_batch(p: Policy, max_batch: int) -> None:
    _check(
        p.name,
        isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch >= 1,
        f"max_batch must be an integer >= 1 (1: no batching), got {max_batch!r}",
    )


def batch_denoise(
    view: SchedulerView, assignments: Sequence[Assignment], max_batch: int, chunk: int | None
) -> list[Assignment]:
    """Note [Batching in policies]: `assignments` (a policy's decision, most important first) with
    batch members added to the DENOISE chunks that `choose_batches` batches. max_batch 1: unchanged."""
    out = list(assignments)
    if max_batch <= 1:
        return out
    by_id = {rt.request_id: rt for rt in view.runnable}
    tag = 0
    i = 0
    while i < len(out):
        a = out[i]
        rt = by_id.get(a.task.request_id)
        i += 1
        if rt is None or a.task.kind is not TaskKind.DENOISE or a.batch is not None or a.cfg:
            continue
        if rt.solo or not batchable(rt.request):
            continue
        d = len(a.ranks)
        # Only chunks that the policy left waiting may join: one that it gave ranks of its own runs
        # in parallel there, which a batch can only make later (its ranks would idle until the next
        # rescheduling point).
        placed = {x.task.request_id for x in out if x is not a}
        candidates = [
            c
            for c in view.runnable
            if c.kind is TaskKind.DENOISE
            and c.request_id not in placed
            and not c.solo
            and d in c.valid_degrees
            and batchable(c.request)
            and not any(x.cfg and x.task.request_id == c.request_id for x in out)
        ]
        batch = next(
            b
            for b in choose_batches(candidates, view.cost, now_s=view.now_s, degree=d, max_batch=max_batch)
            if a.task in b.tasks
        )
        if batch.size < 2:
            continue
        members = [t for t in batch.tasks if t != a.task]
        joined = [Assignment(t, a.ranks, _steps(by_id[t.request_id], chunk), batch=tag) for t in members]
        out = [*out[: i - 1], dataclasses.replace(a, batch=tag), *joined, *out[i:]]
        i += len(joined)
        tag += 1
    return out


def _first_chunk(view: SchedulerView, rt: RunnableTask, chunk: int | None) -> int:
    """Steps of `rt`'s first DENOISE chunk as a policy with `chunk` would run it (`_steps` of its
    chunk as the scheduler will list it)."""
    if chunk is None:
        return min(view.chunk_steps, rt.remaining_steps)
    return rt.remaining_steps if chunk == 0 else min(chunk, rt.remaining_steps)


def encode_ahead(
    view: SchedulerView,
    assignments: Sequence[Assignment],
    max_batch: int,
    chunk: int | None,
    hold: Callable[[RunnableTask], bool] | None = None,
) -> list[Assignment]:
    """Note [Encoding ahead for batches]: `assignments` (after `batch_denoise`) with each batchable
    DENOISE chunk (alone or a batch) that a waiting request should join replaced, in place, by that
    request's ENCODE on the chunk's ranks. A chunk with a member for which `hold` is true never waits
    for an encode (step-preempt: started non-preemptible requests are never paused). max_batch 1:
    unchanged."""
    out = list(assignments)
    if max_batch <= 1:
        return out
    assigned = {a.task.request_id for a in out}
    waiting = [
        rt
        for rt in view.runnable
        if rt.kind is TaskKind.ENCODE
        and rt.request_id not in assigned
        and not rt.solo
        and batchable(rt.request)
    ]
    if not waiting:
        return out
    by_id = {rt.request_id: rt for rt in view.runnable}
    result: list[Assignment] = []
    seen_tags: set[int] = set()
    for a in out:
        rt = by_id.get(a.task.request_id)
        if rt is None or a.task.kind is not TaskKind.DENOISE or a.cfg or rt.solo or not batchable(rt.request):
            result.append(a)
            continue
        if a.batch is not None and a.batch in seen_tags:
            continue  # a later member of a batch already decided
        members = [a] if a.batch is None else [x for x in out if x.batch == a.batch]
        if a.batch is not None:
            seen_tags.add(a.batch)
        if hold is not None and any(hold(by_id[m.task.request_id]) for m in members):
            result.extend(members)
            continue
        chunks = []
        for m in members:
            steps = m.num_steps if m.num_steps is not None else m.task.num_steps
            task = Task(m.task.request_id, TaskKind.DENOISE, m.task.start, m.task.start + steps)
            chunks.append(dataclasses.replace(by_id[m.task.request_id], task=task))
        pick = choose_encode_ahead(
            chunks,
            waiting,
            view.cost,
            now_s=view.now_s,
            degree=len(a.ranks),
            max_batch=max_batch,
            first_chunk=lambda w: _first_chunk(view, w, chunk),
        )
        if pick is None:
            result.extend(members)
            continue
        waiting.remove(pick)
        result.append(Assignment(pick.task, a.ranks))
    return result


def _check_cfg(p: Policy, cfg: str) -> None:
    _check(p.name, cfg in kCfgModes, f"cfg must be one of {', '.join(kCfgModes)}, got {cfg!r}")


def _cfg_choice(rt: RunnableTask, mode: str) -> dict[int, bool]:
    """Group size -> whether a DENOISE chunk of `rt` at that size runs CFG-parallel (Note
    [CFG-parallel in policies]); every size it may take is a key."""
    plain = set(rt.valid_degrees)
    cfg = set(rt.cfg_step_s) if mode != "off" and rt.kind is TaskKind.DENOISE else set()
    choice = {}
    for g in sorted(plain | cfg):
        if g not in cfg:
            choice[g] = False
        elif g not in plain or mode == "on":
            choice[g] = True
        else:
            choice[g] = rt.cfg_step_s[g] < rt.step_s[g]
    return choice


def cfg_view(view: SchedulerView, mode: str) -> SchedulerView:
    """The view a policy schedules on under `cfg=mode`: each DENOISE chunk of a request with true CFG
    costs, at every group size, what its chosen layout costs there, and sizes only CFG-parallel allows
    are valid degrees (Note [CFG-parallel in policies]). Unchanged with mode off or no such request."""
    if mode == "off" or not any(rt.cfg_step_s and rt.kind is TaskKind.DENOISE for rt in view.runnable):
        return view
    runnable = []
    for rt in view.runnable:
        choice = _cfg_choice(rt, mode)
        if not any(choice.values()):
            runnable.append(rt)
            continue
        step_s, task_s, remaining_s = dict(rt.step_s), dict(rt.task_s), dict(rt.remaining_s)
        stages = rt.remaining_s[1] - rt.remaining_steps * rt.step_s[1]  # ENCODE/DECODE left, one rank
        for g, use in choice.items():
            if use:
                step_s[g] = rt.cfg_step_s[g]
                task_s[g] = rt.task.num_steps * step_s[g]
                remaining_s[g] = stages + rt.remaining_steps * step_s[g]
        runnable.append(
            dataclasses.replace(
                rt,
                valid_degrees=tuple(sorted(choice)),
                step_s=step_s,
                task_s=task_s,
                remaining_s=remaining_s,
            )
        )
    return dataclasses.replace(view, runnable=tuple(runnable))


def _cfg_ranks(rt: RunnableTask, ranks: Sequence[int]) -> tuple[int, ...]:
    """`ranks` (2k of them) ordered as two halves: first the k that keep the most of the state in place
    (the conditional half), then, of the others, the same for the unconditional half."""
    k = len(ranks) // 2
    first = choose_ranks_for_reuse(rt.layout, ranks, k, rt.dim_size)
    rest = [r for r in ranks if r not in first]
    return (*first, *choose_ranks_for_reuse(rt.layout, rest, k, rt.dim_size))


def finish(
    view: SchedulerView,
    assignments: Sequence[Assignment],
    mode: str,
    max_batch: int,
    chunk: int | None,
    *,
    ahead: bool = True,
    hold: Callable[[RunnableTask], bool] | None = None,
) -> list[Assignment]:
    """What every built-in policy does with its assignments (made on `cfg_view(view, mode)`): marks
    the DENOISE chunks whose chosen layout is CFG-parallel (Note [CFG-parallel in policies]), then
    batches (Note [Batching in policies]) and, with `ahead`, encodes ahead for batches (Note
    [Encoding ahead for batches])."""
    out = list(assignments)
    if mode != "off":
        by_id = {rt.request_id: rt for rt in view.runnable}
        for i, a in enumerate(out):
            rt = by_id.get(a.task.request_id)
            if rt is None or a.task.kind is not TaskKind.DENOISE or not rt.cfg_step_s or a.batch is not None:
                continue
            if _cfg_choice(rt, mode).get(len(a.ranks), False):
                out[i] = dataclasses.replace(a, ranks=_cfg_ranks(rt, a.ranks), cfg=True)
    out = batch_denoise(view, out, max_batch, chunk)
    return encode_ahead(view, out, max_batch, chunk, hold) if ahead else out


def _assign_greedily(
    view: SchedulerView, order: Sequence[RunnableTask], max_sp: int, chunk: int | None, tol: float
) -> list[Assignment]:
    """In `order`, give each DENOISE task its fastest degree within the free ranks (and max_sp), the
    other tasks one rank, until the free ranks run out."""
    free = list(view.free_ranks)
    cap = max_sp or view.world_size
    holders = state_holders(view)
    out = []
    for rt in order:
        if not free:
            break
        d = _fastest_degree(rt, min(cap, len(free)), tol) if rt.kind is TaskKind.DENOISE else 1
        ranks = place(rt, free, d, _others(holders, rt.request_id))
        free = [r for r in free if r not in ranks]
        out.append(Assignment(rt.task, ranks, _steps(rt, chunk)))
    return out


def _degrees(rt: RunnableTask, cap: int) -> list[int]:
    return [d for d in rt.valid_degrees if d <= cap] or [1]


def _meets(rt: RunnableTask, now: float, d: int, margin: float) -> bool:
    """Whether `rt` alone at degree `d` from `now` ends by its deadline (True without one)."""
    deadline = rt.request.deadline_s
    return deadline is None or now + margin * rt.remaining_s[d] <= deadline


def _edf_key(rt: RunnableTask) -> tuple:
    deadline = rt.request.deadline_s
    return (deadline is None, deadline if deadline is not None else math.inf, rt.request.arrival_s)


def _best_fit(
    view: SchedulerView,
    order: Sequence[RunnableTask],
    cap: int,
    margin: float,
    tol: float,
    chunk: int | None,
    hopeless_fastest: bool,
    strict: Mapping[str, int] | None = None,
) -> list[Assignment]:
    """edf-best-fit's two passes over `order` (see EdfBestFitPolicy). A DENOISE chunk of a request in
    `strict` that cannot get at least its degree there gets nothing (it waits) instead of fewer ranks."""
    strict = strict or {}
    now = view.now_s
    spare = len(view.free_ranks)
    chosen: list[list] = []  # [runnable task, degree]
    for rt in order:
        if spare == 0:
            break
        d = 1
        if rt.kind is TaskKind.DENOISE:
            want = 1
            if rt.request.deadline_s is not None:
                fits = [x for x in _degrees(rt, cap) if _meets(rt, now, x, margin)]
                if fits:
                    want = fits[0]
                elif hopeless_fastest:
                    want = _fastest_degree(rt, min(cap, spare), tol)
            d = max(x for x in _degrees(rt, cap) if x <= min(want, spare))
            if d < strict.get(rt.request_id, 0):
                continue
        chosen.append([rt, d])
        spare -= d
    changed = True
    while spare > 0 and changed:
        changed = False
        for item in chosen:
            rt, d = item
            if rt.kind is not TaskKind.DENOISE:
                continue
            ups = [
                x
                for x in _degrees(rt, cap)
                if d < x <= d + spare and rt.step_s[x] < rt.step_s[d] * (1.0 - tol)
            ]
            if ups:
                spare -= ups[0] - d
                item[1] = ups[0]
                changed = True
    free = list(view.free_ranks)
    holders = state_holders(view)
    out = []
    for rt, d in chosen:
        ranks = place(rt, free, d, _others(holders, rt.request_id))
        free = [r for r in free if r not in ranks]
        out.append(Assignment(rt.task, ranks, _steps(rt, chunk)))
    return out


def _static_groups(
    view: SchedulerView, degree_of: typing.Callable[[RunnableTask], int], chunk: int | None
) -> list[Assignment]:
    """Static parallelism: a request gets a group of `degree_of(rt)` ranks (the largest valid degree <=
    it) when it starts and keeps it, reserved, for its whole life.
    Groups are aligned blocks [k*d, (k+1)*d) when one is free. FCFS, no overtaking within a degree."""
    free = set(view.free_ranks)
    reserved = {r for t in view.running for r in t.ranks}
    reserved |= {r for rt in view.runnable if rt.started for r in rt.last_ranks}
    out = []
    for rt in view.runnable:
        if rt.started:
            group = rt.last_ranks
            if set(group) <= free:
                free -= set(group)
                out.append(Assignment(rt.task, group, _steps(rt, chunk)))
    for rt in view.runnable:
        if rt.started:
            continue
        d = max(x for x in rt.valid_degrees if x <= degree_of(rt))
        available = sorted(free - reserved)
        if len(available) < d:
            continue
        blocks = [tuple(range(s, s + d)) for s in range(0, view.world_size - d + 1, d)]
        group = next((b for b in blocks if set(b) <= set(available)), tuple(available[:d]))
        free -= set(group)
        reserved |= set(group)
        out.append(Assignment(rt.task, group, _steps(rt, chunk)))
    return out


# Registry.

_REGISTRY: dict[str, type[Policy]] = {}

P = typing.TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make a dataclass Policy available to `make_policy` under `cls.name`."""
    if not cls.name or not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass with a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def _convert(policy: str, key: str, kind: object, text: str) -> object:
    args = typing.get_args(kind)
    if type(None) in args:  # an optional parameter: "none" is None, else its other type
        if text.lower() == "none":
            return None
        kind = next(a for a in args if a is not type(None))
    assert isinstance(kind, type)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise PolicySpecError(
            f"policy {policy!r}: parameter {key!r} expects {kind.__name__}, got {text!r}"
        ) from None


def make_policy(spec: str) -> Policy:
    """Build a policy from "name" or "name:key=value,key=value" (keys may use - or _).

    Raises PolicySpecError naming what is wrong: unknown policy (listing the available ones), malformed
    item, unknown or repeated parameter (listing the parameters), unconvertible or out-of-range value.
    """
    name, _, params = spec.strip().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise PolicySpecError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    cls = _REGISTRY[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not value.strip():
            raise PolicySpecError(f"policy {name!r}: expected key=value, got {item!r}")
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PolicySpecError(f"policy {name!r} has no parameter {key!r}; parameters: {known}")
        if key in kwargs:
            raise PolicySpecError(f"policy {name!r}: parameter {key!r} given twice")
        kwargs[key] = _convert(name, key, fields[key], value.strip())
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise PolicySpecError(f"policy {name!r}: {e}") from None


def _validate_common(p: Policy, chunk: int | None, max_sp: int, tol: float) -> None:
    _check(
        p.name,
        chunk is None or chunk >= 0,
        f"chunk must be None (the scheduler's chunk_steps) or >= 0 (0: all remaining steps), got {chunk}",
    )
    _check(p.name, max_sp >= 0, f"max_sp must be >= 0 (0: world size), got {max_sp}")
    _check(p.name, 0.0 <= tol < 1.0 and math.isfinite(tol), f"tol must be in [0, 1), got {tol}")


# Built-in policies.


@register_policy
@dataclass
class StaticPolicy(Policy):
    """Baseline: every request gets a fixed group of `sp` ranks (the largest valid degree <= sp) when
    it starts and keeps it, reserved, for its whole life; all its tasks run on that group. Groups are aligned blocks [k*sp, (k+1)*sp) when one is free. FCFS.
    A fixed pipeline runs plain SP (cfg=off, the default); cfg=on makes it the static CFG-parallel
    configuration (two halves of sp/2) for requests with true CFG, whose first chunk then reshards."""

    name: ClassVar[str] = "static"
    sp: int = 1  # SP degree of every request
    # DENOISE steps per task; 0: all remaining steps in one task. Unlike the elastic policies, the
    # default is not the scheduler's chunk_steps: a fixed pipeline has no rescheduling points, so it
    # should not pay a task's host overhead per chunk. chunk=None gives the scheduler's chunk_steps.
    chunk: int | None = 0
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "off"

    def __post_init__(self) -> None:
        _check(self.name, self.sp >= 1, f"sp must be >= 1, got {self.sp}")
        _validate_common(self, self.chunk, 0, 0.0)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        out = _static_groups(cfg_view(view, self.cfg), lambda rt: self.sp, self.chunk)
        return finish(view, out, self.cfg, self.max_batch, self.chunk)


@dataclass
class GreedyOrderPolicy(Policy):
    """Base of the policies that differ only in the order they serve runnable tasks: in that order,
    each DENOISE chunk gets the smallest valid degree whose step time is within `tol` of the fastest
    degree that fits the free ranks and `cap` (default `max_sp`); other tasks one rank. Subclasses
    give `name` and `order` (and may narrow `cap`)."""

    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int | None = None  # DENOISE steps per task; None: the scheduler's chunk_steps; 0: all remaining
    tol: float = 0.05  # relative step-time gain below which more ranks are not worth taking
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "auto"

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)

    @abc.abstractmethod
    def order(self, view: SchedulerView) -> list[RunnableTask]:
        """The runnable tasks, the first served first."""

    def cap(self, view: SchedulerView) -> int:
        """The largest degree a chunk may get now (0: world size)."""
        return self.max_sp

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        cview = cfg_view(view, self.cfg)
        out = _assign_greedily(cview, self.order(cview), self.cap(cview), self.chunk, self.tol)
        return finish(view, out, self.cfg, self.max_batch, self.chunk)


@register_policy
@dataclass
class FcfsElasticPolicy(GreedyOrderPolicy):
    """First come first served; each DENOISE chunk gets the smallest valid degree whose step time is
    within `tol` of the fastest degree that fits the free ranks and `max_sp`; other tasks one rank."""

    name: ClassVar[str] = "fcfs-elastic"

    def order(self, view: SchedulerView) -> list[RunnableTask]:
        return sorted(view.runnable, key=lambda rt: (rt.request.arrival_s, -rt.request.priority))


@register_policy
@dataclass
class SrtfPolicy(GreedyOrderPolicy):
    """Shortest remaining time first (estimated at degree 1), re-decided at every rescheduling point,
    so a long request waits (is preempted) between chunks while shorter ones run. Degrees as in
    fcfs-elastic."""

    name: ClassVar[str] = "srtf"

    def order(self, view: SchedulerView) -> list[RunnableTask]:
        return sorted(view.runnable, key=lambda rt: (rt.remaining_s[1], rt.request.arrival_s))


@register_policy
@dataclass
class EdfBestFitPolicy(Policy):
    """Earliest deadline first with best-fit degrees.

    Order: requests that can still meet their deadline (earliest first), then requests without one
    (by arrival), then, if `hopeless_last`, those that cannot meet it at any degree (earliest first).
    Pass 1: in that order, each DENOISE chunk asks for the smallest valid degree whose estimated
    finish (now + margin * remaining seconds) meets the deadline (degree 1 without a deadline), and
    gets the largest valid degree <= that which the free ranks still allow; other tasks get one rank.
    A request that can no longer meet its deadline asks, with `hopeless_fastest`, for the fastest
    degree the free ranks allow (within `tol`), so it ends as early as it can; it still comes after
    every request that can make it (`hopeless_last`), so it only gets ranks they leave. Pass 2: spare
    ranks are spread, in the same order, one degree step at a time, to DENOISE chunks whose step time
    drops by more than `tol`.
    """

    name: ClassVar[str] = "edf-best-fit"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int | None = None  # DENOISE steps per task; None: the scheduler's chunk_steps; 0: all remaining
    tol: float = 0.05  # relative step-time gain below which spare ranks are not given
    margin: float = 1.0  # multiplier on remaining-time estimates when testing a deadline
    hopeless_last: bool = True  # serve requests that cannot meet their deadline after all others
    hopeless_fastest: bool = True  # such requests ask for the fastest free degree (else one rank)
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "auto"

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)
        _check(
            self.name, self.margin > 0 and math.isfinite(self.margin), f"margin must be > 0: {self.margin}"
        )

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        original, view = view, cfg_view(view, self.cfg)
        cap = self.max_sp or view.world_size
        now = view.now_s

        def urgency(rt: RunnableTask) -> tuple:
            deadline = rt.request.deadline_s
            if deadline is None:
                group = 1
            elif self.hopeless_last and not any(_meets(rt, now, d, self.margin) for d in _degrees(rt, cap)):
                group = 2
            else:
                group = 0
            return (group, deadline if deadline is not None else math.inf, rt.request.arrival_s)

        order = sorted(view.runnable, key=urgency)
        out = _best_fit(view, order, cap, self.margin, self.tol, self.chunk, self.hopeless_fastest)
        return finish(original, out, self.cfg, self.max_batch, self.chunk)


# The paper's baselines and policies (GF-DiT, arXiv 2606.13501: its public code defines them).


@register_policy
@dataclass
class RsspPolicy(Policy):
    """Request-size-aware static parallelism (the paper's RSSP baseline): a fixed SP degree per
    workload class (`Request.slo_class`: S, M, L; any other class gets `other`). Like `static`, a
    request keeps its group, reserved, for its whole life; FCFS; plain SP unless cfg=on."""

    name: ClassVar[str] = "rssp"
    S: int = 4  # SP degree of class S
    M: int = 4  # SP degree of class M
    L: int = 1  # SP degree of class L
    other: int = 1  # SP degree of requests of any other class
    chunk: int | None = 0  # as static's chunk (0: one DENOISE task; None: the scheduler's chunk_steps)
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "off"

    def __post_init__(self) -> None:
        for key in ("S", "M", "L", "other"):
            _check(self.name, getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        _validate_common(self, self.chunk, 0, 0.0)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)

    def degree(self, request: Request) -> int:
        return {"S": self.S, "M": self.M, "L": self.L}.get(request.slo_class, self.other)

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        out = _static_groups(cfg_view(view, self.cfg), lambda rt: self.degree(rt.request), self.chunk)
        return finish(view, out, self.cfg, self.max_batch, self.chunk)


@register_policy
@dataclass
class TetriServePolicy(Policy):
    """A TetriServe-style policy: each request's SP degree is chosen once, at admission (its first
    task), as the smallest valid degree whose estimated finish (now + margin * standalone remaining
    time) meets its deadline (the fastest degree within `tol` when none does or it has none). It keeps
    that degree for ENCODE, every DENOISE chunk and DECODE, but runs each chunk
    on whichever ranks are free (step-level packing, no reserved group). No preemption: admitted
    requests are served first, in arrival order, and a new request (earliest deadline first) is
    admitted only onto ranks that no waiting admitted request needs now."""

    name: ClassVar[str] = "tetriserve"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int | None = None  # DENOISE steps per task; None: the scheduler's chunk_steps; 0: all remaining
    tol: float = 0.05  # relative step-time gain below which a larger degree is not the "fastest"
    margin: float = 1.0  # multiplier on remaining-time estimates when testing a deadline
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "auto"

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)
        _check(
            self.name, self.margin > 0 and math.isfinite(self.margin), f"margin must be > 0: {self.margin}"
        )

    def admission_degree(self, rt: RunnableTask, now: float, cap: int) -> int:
        fits = [d for d in _degrees(rt, cap) if _meets(rt, now, d, self.margin)]
        if rt.request.deadline_s is not None and fits:
            return fits[0]
        return _fastest_degree(rt, cap, self.tol)

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        original, view = view, cfg_view(view, self.cfg)
        cap = self.max_sp or view.world_size
        free = list(view.free_ranks)
        holders = state_holders(view)
        out = []
        held = 0  # free ranks kept for admitted requests that do not fit yet
        admitted = sorted((rt for rt in view.runnable if rt.started), key=lambda rt: rt.request.arrival_s)
        for rt in admitted:
            d = len(rt.last_ranks)
            if d > len(free) - held:
                held += d
                continue
            ranks = place(rt, free, d, _others(holders, rt.request_id))
            free = [r for r in free if r not in ranks]
            out.append(Assignment(rt.task, ranks, _steps(rt, self.chunk)))
        new = sorted((rt for rt in view.runnable if not rt.started), key=_edf_key)
        for rt in new:
            d = self.admission_degree(rt, view.now_s, cap)
            if d > len(free) - held:
                continue  # later, smaller requests may still fit (backfilling)
            ranks = place(rt, free, d, _others(holders, rt.request_id))
            free = [r for r in free if r not in ranks]
            out.append(Assignment(rt.task, ranks, _steps(rt, self.chunk)))
        return finish(original, out, self.cfg, self.max_batch, self.chunk)


@register_policy
@dataclass
class StepPreemptPolicy(Policy):
    """Priority preemption at chunk boundaries (the paper's step-preempt baseline). At every
    rescheduling point, started non-preemptible requests come first (they are never paused), then all
    others by priority (higher first), deadline and arrival. Degrees are edf-best-fit's (the smallest
    that meets the deadline, the fastest free one for a late request, spare ranks spread). A
    preemptible request (`Request.preemptible`) comes after the others of its priority, so its ranks go
    to higher-priority work first; when fewer ranks than its last group are left, it is demoted to the
    largest degree they allow (`demote`), or paused until its degree is free again (not `demote`). The
    scheduler counts either as a preemption."""

    name: ClassVar[str] = "step-preempt"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int | None = None  # DENOISE steps per task; None: the scheduler's chunk_steps; 0: all remaining
    tol: float = 0.05  # relative step-time gain below which spare ranks are not given
    margin: float = 1.0  # multiplier on remaining-time estimates when testing a deadline
    demote: bool = True  # a preemptible request runs on fewer ranks (True) or waits (False)
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "auto"

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)
        _check(
            self.name, self.margin > 0 and math.isfinite(self.margin), f"margin must be > 0: {self.margin}"
        )

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        original, view = view, cfg_view(view, self.cfg)

        def key(rt: RunnableTask) -> tuple:
            protected = rt.started and not rt.request.preemptible
            return (not protected, -rt.request.priority, *_edf_key(rt))

        order = sorted(view.runnable, key=key)
        strict = {}
        if not self.demote:  # pause: a preemptible request runs again only on as many ranks as before
            strict = {rt.request_id: len(rt.last_ranks) for rt in order if rt.request.preemptible}
        cap = self.max_sp or view.world_size
        out = _best_fit(view, order, cap, self.margin, self.tol, self.chunk, True, strict)
        return finish(
            original,
            out,
            self.cfg,
            self.max_batch,
            self.chunk,
            hold=lambda rt: rt.started and not rt.request.preemptible,
        )


@register_policy
@dataclass
class LoadAdaptivePolicy(GreedyOrderPolicy):
    """Load-adaptive parallelism (the paper's load-adaptive baseline): degrees shrink as the queue
    grows. With q requests in the system (runnable and running), every DENOISE chunk may use at most
    max(1, world_size // q) ranks (and `max_sp`): one request alone gets every rank, a full queue one
    rank each. FCFS; under the cap, the fastest degree within `tol`."""

    name: ClassVar[str] = "load-adaptive"

    def cap(self, view: SchedulerView) -> int:
        q = len(view.runnable) + len({t.task.request_id for t in view.running})
        return max(1, min(self.max_sp or view.world_size, view.world_size // max(1, q)))

    def order(self, view: SchedulerView) -> list[RunnableTask]:
        return sorted(view.runnable, key=lambda rt: (rt.request.arrival_s, -rt.request.priority))


@register_policy
@dataclass
class SjfPolicy(GreedyOrderPolicy):
    """Shortest job first: requests that have started continue first (by arrival: a started request is
    not overtaken, unlike srtf), then new ones by their whole standalone time on one rank, shortest
    first. Degrees as in fcfs-elastic."""

    name: ClassVar[str] = "sjf"

    def order(self, view: SchedulerView) -> list[RunnableTask]:
        def key(rt: RunnableTask) -> tuple:
            if rt.started:
                return (0, 0.0, rt.request.arrival_s)
            return (1, view.cost.standalone_time(rt.request, 1), rt.request.arrival_s)

        return sorted(view.runnable, key=key)


@register_policy
@dataclass
class EdfGreedyPolicy(GreedyOrderPolicy):
    """Clean earliest deadline first (the paper's EDF baseline): requests by deadline (those without one
    last, by arrival), each DENOISE chunk greedily given the fastest degree within `tol` that the free
    ranks allow; no best fit, no special treatment of late requests."""

    name: ClassVar[str] = "edf-greedy"

    def order(self, view: SchedulerView) -> list[RunnableTask]:
        return sorted(view.runnable, key=_edf_key)


@register_policy
@dataclass
class DisaggregatedPolicy(Policy):
    """Disaggregated stages: the last `stage_ranks` ranks run only ENCODE and DECODE (one
    rank each); the others run only DENOISE, earliest deadline first with the fastest degree within
    `tol` (as edf-greedy). The latent moves from its stage rank to the denoise group after ENCODE and
    to one stage rank for DECODE (two reshards per request). With world_size <= stage_ranks, every
    rank runs everything."""

    name: ClassVar[str] = "disaggregated"
    stage_ranks: int = 1  # ranks reserved for ENCODE / DECODE
    max_sp: int = 0  # largest DENOISE degree; 0: the denoise ranks
    chunk: int | None = None  # DENOISE steps per task; None: the scheduler's chunk_steps; 0: all remaining
    tol: float = 0.05  # relative step-time gain below which more ranks are not worth taking
    max_batch: int = DEFAULT_MAX_BATCH  # DENOISE chunks per batch (Note [Batching in policies]); 1: none
    # CFG-parallel for requests with true CFG (Note [CFG-parallel in policies]): auto (the faster by the
    # cost model), on, off; ignored for models without true CFG (Flux)
    cfg: str = "auto"

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check_max_batch(self, self.max_batch)
        _check_cfg(self, self.cfg)
        _check(self.name, self.stage_ranks >= 1, f"stage_ranks must be >= 1, got {self.stage_ranks}")

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        original, view = view, cfg_view(view, self.cfg)
        if view.world_size <= self.stage_ranks:
            out = _assign_greedily(
                view, sorted(view.runnable, key=_edf_key), self.max_sp, self.chunk, self.tol
            )
            return finish(original, out, self.cfg, self.max_batch, self.chunk)
        first_stage = view.world_size - self.stage_ranks
        stage_free = [r for r in view.free_ranks if r >= first_stage]
        denoise_free = [r for r in view.free_ranks if r < first_stage]
        cap = min(self.max_sp or first_stage, first_stage)
        holders = state_holders(view)
        out = []
        for rt in sorted(view.runnable, key=_edf_key):
            if rt.kind is TaskKind.DENOISE:
                if not denoise_free:
                    continue
                d = _fastest_degree(rt, min(cap, len(denoise_free)), self.tol)
                ranks = place(rt, denoise_free, d, _others(holders, rt.request_id))
                denoise_free = [r for r in denoise_free if r not in ranks]
            else:
                if not stage_free:
                    continue
                ranks = place(rt, stage_free, 1, _others(holders, rt.request_id))
                stage_free = [r for r in stage_free if r not in ranks]
            out.append(Assignment(rt.task, ranks, _steps(rt, self.chunk)))
        return finish(original, out, self.cfg, self.max_batch, self.chunk, ahead=False)
