"""The central, event-driven scheduler (rank 0). Pure Python: it never touches tensors or CUDA.

Events in: `submit`, `on_task_done`, `on_task_failed`, `cancel`. Decisions out: `schedule(now)` asks the
policy for assignments at the current rescheduling points, validates them (PolicyError on a bad one)
and returns them with the task actually run and its reshard plan. The caller (the engine, or
`gfdit.sim`) dispatches them to workers and later reports their end. Not thread-safe: one caller.

Note [State layout between tasks]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The scheduler tracks one Layout per request (its latent; conditioning such as text embeddings is
small, replicated by the worker over the group and not tracked), split along `state_dim`:
  - ENCODE on group G leaves the state SHARDED over G (even split; the initial noise is drawn there);
  - DENOISE and DECODE on G need it SHARDED over G first (a reshard from wherever it is);
    DENOISE leaves it SHARDED over G; a CFG-parallel DENOISE chunk (Assignment.cfg, Note [CFG-parallel
    in policies]) on G = A + B (halves of k) needs and leaves it SHARDED over A mirrored on B; DECODE gathers it on G[0], which decodes and returns the
    result, and ends the request (its state is released).
A request not given ranks at a rescheduling point waits; its state stays on its last group.

Note [Batched chunks in the scheduler]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Assignments with one `batch` tag (Note [Batching in policies] in gfdit.policy) are DENOISE chunks of
batchable requests of one model and token grid on the same ordered ranks; they run as one batched
forward (Note [Batched steps]). Each member keeps its own record, layout, reshard plan and history
entry (TaskRecord.batch_size > 1); a rank is busy until every member that runs there has reported.
The estimated end of every member is the batched chunk's (CostModel.batch_chunk_time after the
longest reshard). The cost model learns from a batched chunk once, from its first member's report,
when all members ran the same number of steps (observe_batch; chunks of unequal lengths are not
learned from: their shrinking batch is not one key).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

from gfdit.batching import batch_key, batchable
from gfdit.cost import (
    AnalyticCostModel,
    CostModel,
    state_bytes_per_index,
    state_dim_size,
    valid_sp_degrees,
)
from gfdit.layout import Layout, plan_reshard
from gfdit.models.presets import check_request, get_preset, runs_true_cfg
from gfdit.policy import Assignment, Policy, RunnableTask, RunningTask, SchedulerView
from gfdit.request import Request, RequestState
from gfdit.tasks import Task, TaskKind, TaskTimings, Trajectory

__all__ = ["PolicyError", "TaskRecord", "RequestRecord", "Scheduler", "kDefaultChunkSteps"]

# Denoising steps per DENOISE task unless a policy asks for another count: the one owner of the
# default chunk size (the engine, `gfdit serve --chunk-steps`, the simulator and the tuner use it).
kDefaultChunkSteps = 2

logger = logging.getLogger(__name__)


class PolicyError(RuntimeError):
    """A policy returned an assignment that breaks the Policy contract (see gfdit.policy)."""


@dataclass
class TaskRecord:
    """One executed (or executing) task of a request."""

    task: Task  # the task as run
    ranks: tuple[int, ...]  # its ordered group
    start_s: float  # dispatch time
    end_s: float | None = None  # completion time (None while running)
    elements_moved: int = 0  # state indices its reshard sent between ranks
    outcome: str = "running"  # "running", "done" or "failed: <reason>"
    batch_size: int = 1  # DENOISE: members of its batched chunk (Note [Batched chunks in the scheduler])
    cfg: bool = False  # DENOISE: ran CFG-parallel (Note [CFG-parallel in policies] in gfdit.policy)


@dataclass
class RequestRecord:
    """Everything the scheduler knows about one request. Owned by the Scheduler: read, don't write."""

    request: Request  # the request as submitted
    trajectory: Trajectory  # its remaining tasks
    dim_size: int  # size of the split dimension of its state
    valid_degrees: tuple[int, ...]  # allowed group sizes, ascending, includes 1
    state: RequestState = RequestState.QUEUED  # lifecycle state
    layout: Layout | None = None  # where its state lives (see Note [State layout between tasks])
    last_ranks: tuple[int, ...] = ()  # group of its last dispatched task
    running: Task | None = None  # the task in flight, if any
    running_ranks: tuple[int, ...] = ()  # its group
    running_batch: tuple[Task, ...] = ()  # the member chunks of its batched task in flight, or ()
    expected_end_s: float | None = None  # estimated end of the task in flight
    runnable_since_s: float = 0.0  # when it last reached a rescheduling point
    num_tasks: int = 0  # tasks dispatched
    num_reshards: int = 0  # tasks that first had to move state between ranks
    elements_moved: int = 0  # state indices moved by those reshards, in total
    bytes_moved: int = 0  # the same in bytes (estimated from the state's bytes per index)
    num_group_changes: int = 0  # tasks whose group differed from the previous task's
    num_preemptions: int = 0  # times its last group's ranks went to another request (it waited or moved)
    num_retries: int = 0  # failed tasks that were retried
    num_reruns: int = 0  # times it restarted from its first task after losing its state (rerun)
    first_start_s: float | None = None  # dispatch of its first task
    finish_s: float | None = None  # when it reached a terminal state
    error: str | None = None  # why it failed
    cancel_requested: bool = False  # cancelled while a task was in flight; ends when it reports
    history: list[TaskRecord] = field(default_factory=list)  # its tasks, in order
    preempted: bool = False  # True while it waits after a preemption (counted once per wait)
    solo: bool = False  # never batched again: a batch it ran in failed (Note [Batching in policies])

    @property
    def latency_s(self) -> float | None:
        """Arrival to terminal state, or None while active."""
        return None if self.finish_s is None else self.finish_s - self.request.arrival_s

    @property
    def met_deadline(self) -> bool | None:
        """None without a deadline; False for any end other than DONE in time."""
        if self.request.deadline_s is None:
            return None
        return self.state is RequestState.DONE and self.finish_s <= self.request.deadline_s + 1e-9


ValidDegrees = Callable[[Request, int], Iterable[int]]


def _cfg_layout(ranks: Sequence[int], dim: int) -> Layout:
    """The state of a CFG-parallel chunk on `ranks`: SHARDED over the first half, mirrored on the
    second (Note [CFG-parallel] in gfdit/models/base.py)."""
    k = len(ranks) // 2
    return Layout.sharded(ranks[:k], dim, mirrors=ranks[k:])


class Scheduler:
    """Event-driven scheduler over `world_size` ranks with a pluggable `policy`.

    `cost_model` (default AnalyticCostModel) gives the estimates policies see and learns from reported
    timings when `learn`. `chunk_steps` is the default DENOISE chunk listed to policies (they may run
    more or fewer steps). `valid_degrees(request, world_size)` gives allowed group sizes (default:
    those dividing the heads and tokens, `gfdit.cost.valid_sp_degrees`). `dim_size(request)` is the
    size of the split dimension (default `gfdit.cost.state_dim_size`; the engine passes the model's
    token count). `state_dim` is the tensor dimension of the layouts. A failed task is retried (on
    the policy's next choice of ranks, from the state where it was) at most `max_retries` times when
    the worker says it can be. `keep_finished`: how many finished requests' records stay queryable
    (the newest ones; None: all, as the simulator needs); a long-running server bounds it, and every
    decision looks at unfinished requests only, so its cost does not grow with the requests served.
    """

    def __init__(
        self,
        world_size: int,
        policy: Policy,
        cost_model: CostModel | None = None,
        *,
        chunk_steps: int = kDefaultChunkSteps,
        valid_degrees: ValidDegrees | None = None,
        dim_size: Callable[[Request], int] | None = None,
        state_dim: int = 1,
        max_retries: int = 0,
        learn: bool = True,
        keep_finished: int | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if keep_finished is not None and keep_finished < 0:
            raise ValueError(f"keep_finished must be >= 0 or None, got {keep_finished}")
        self.world_size = world_size
        self.policy = policy
        self.cost_model = cost_model if cost_model is not None else AnalyticCostModel()
        self.chunk_steps = chunk_steps
        self.state_dim = state_dim
        self.max_retries = max_retries
        self.learn = learn
        self._valid_degrees = valid_degrees or valid_sp_degrees
        self._dim_size = dim_size or state_dim_size
        self.keep_finished = keep_finished
        self._records: dict[str, RequestRecord] = {}  # kept records, in submission order
        self._active: dict[str, RequestRecord] = {}  # the unfinished ones among them
        self._finished: collections.deque[str] = collections.deque()  # ids of kept finished, oldest first
        self._busy: dict[int, set[str]] = {}  # rank -> request ids of the task(s) running there
        self._lost: set[int] = set()  # ranks removed from service (lose_rank): never free again
        self._fenced: set[int] = set()  # ranks still running an abandoned task (rerun): busy until unfenced
        self.num_preemptions = 0  # preemptions of all requests so far (see RequestRecord.num_preemptions)

    # Queries.

    @property
    def records(self) -> Mapping[str, RequestRecord]:
        """Submitted requests by id, in submission order (read-only view): every unfinished one and the
        newest `keep_finished` finished ones."""
        return MappingProxyType(self._records)

    @property
    def active(self) -> Mapping[str, RequestRecord]:
        """Requests not yet in a terminal state, by id, in submission order (read-only view)."""
        return MappingProxyType(self._active)

    def record(self, request_id: str) -> RequestRecord:
        try:
            return self._records[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    @property
    def free_ranks(self) -> tuple[int, ...]:
        return tuple(
            r
            for r in range(self.world_size)
            if r not in self._busy and r not in self._lost and r not in self._fenced
        )

    @property
    def lost_ranks(self) -> frozenset[int]:
        """Ranks removed from service by `lose_rank`."""
        return frozenset(self._lost)

    @property
    def num_active(self) -> int:
        """Requests not yet in a terminal state."""
        return len(self._active)

    # Events.

    def submit(self, request: Request) -> RequestRecord:
        """Accept `request` (it becomes runnable at request.arrival_s). ValueError for a duplicate id,
        an unknown model, frames for an image model, or a request no group size is valid for."""
        if request.request_id in self._records:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        try:  # the one validation of a request's fields (the engine adds the prompt's token count)
            check_request(get_preset(request.model), request)
        except ValueError as e:
            raise ValueError(f"request {request.request_id!r}: {e}") from None
        dim_size = self._dim_size(request)
        if dim_size < 1:
            raise ValueError(f"request {request.request_id!r}: {request.width}x{request.height} is too small")
        degrees = tuple(
            sorted({d for d in self._valid_degrees(request, self.world_size) if 1 <= d <= self.world_size})
        )
        if 1 not in degrees:
            raise ValueError(f"request {request.request_id!r}: valid degrees {degrees} do not include 1")
        rec = RequestRecord(
            request=request,
            trajectory=Trajectory(request.request_id, request.num_inference_steps, self.chunk_steps),
            dim_size=dim_size,
            valid_degrees=degrees,
            runnable_since_s=request.arrival_s,
        )
        self._records[request.request_id] = rec
        self._active[request.request_id] = rec
        return rec

    def cancel(self, request_id: str, now: float) -> bool:
        """Cancel a request. Waiting: it ends now; the caller drops its state on `record.last_ranks`.
        Running: it ends when its task reports. Returns False if it had already ended."""
        rec = self.record(request_id)
        if rec.state.is_terminal:
            return False
        if rec.running is not None:
            rec.cancel_requested = True
        else:
            self._finish(rec, RequestState.CANCELLED, now)
        return True

    def on_task_done(self, task: Task, ranks: Sequence[int], timings: TaskTimings) -> None:
        """A dispatched task finished on `ranks` (as dispatched). Frees the ranks, updates the request's
        layout and progress, and feeds the cost model."""
        rec = self._running_record(task, ranks)
        batch = rec.running_batch
        cfg = rec.history[-1].cfg
        self._release(rec, timings.end_s, "done")
        if self.learn:
            r = rec.request
            if cfg:
                self.cost_model.observe_cfg(
                    r.model, r.width, r.height, r.num_frames, len(rec.last_ranks) // 2,
                    timings.compute_s, max(1, task.num_steps),
                )  # fmt: skip
            elif len(batch) < 2:
                self.cost_model.observe(
                    task.kind, r.model, r.width, r.height, r.num_frames, len(rec.last_ranks),
                    timings.compute_s, max(1, task.num_steps),
                )  # fmt: skip
            elif batch[0] == task and len({t.num_steps for t in batch}) == 1:
                self.cost_model.observe_batch(
                    r.model, r.width, r.height, r.num_frames, len(rec.last_ranks), len(batch),
                    timings.compute_s, max(1, task.num_steps),
                )  # fmt: skip
        rec.trajectory.advance(task)
        group = rec.last_ranks
        if cfg:
            rec.layout = _cfg_layout(group, self.state_dim)
        elif task.kind in (TaskKind.ENCODE, TaskKind.DENOISE):
            rec.layout = Layout.sharded(group, self.state_dim)
        if rec.cancel_requested:
            self._finish(rec, RequestState.CANCELLED, timings.end_s)
        elif task.kind is TaskKind.DECODE:  # the last task: the result went to the front end
            self._finish(rec, RequestState.DONE, timings.end_s)
        else:
            rec.state = RequestState.WAITING
            rec.runnable_since_s = timings.end_s

    def on_task_failed(
        self, task: Task, ranks: Sequence[int], reason: str, now: float, retry: bool = False
    ) -> None:
        """A dispatched task failed. With `retry` (the worker vouches that the request's state is intact
        where it was before the task) and retries left, the task becomes runnable again; otherwise the
        request fails with `reason`."""
        rec = self._running_record(task, ranks)
        self._release(rec, now, f"failed: {reason}")
        if rec.cancel_requested:
            self._finish(rec, RequestState.CANCELLED, now)
        elif retry and rec.num_retries < self.max_retries:
            rec.num_retries += 1
            rec.state = RequestState.WAITING
            rec.runnable_since_s = now
            logger.warning("retrying %s after failure: %s", task, reason)
        else:
            rec.error = reason
            self._finish(rec, RequestState.FAILED, now)
            logger.warning("request %s failed in %s: %s", task.request_id, task, reason)

    def lose_rank(self, rank: int) -> None:
        """Removes `rank` from service for good: no policy sees it free again. Requests whose state
        lived there are the caller's to `rerun` (the scheduler does not know where conditioning
        copies live, only the latent's layout)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        self._lost.add(rank)
        self._fenced.discard(rank)

    def rerun(
        self, request_id: str, now: float, reason: str, fence: Iterable[int] = (), *, solo: bool = False
    ) -> None:
        """Restarts an unfinished request from its first task: its state was lost with a rank, or a
        batch it ran in failed (then `solo`: it is never batched again). A task in flight is
        abandoned; its ranks in `fence` stay busy (they may still be running it) until `unfence`, the
        others are free at once. A request whose cancel was asked ends CANCELLED."""
        rec = self.record(request_id)
        rec.solo = rec.solo or solo
        if rec.state.is_terminal:
            raise ValueError(f"request {request_id!r} already ended ({rec.state.value})")
        if rec.running is not None:
            fenced = set(fence) & set(rec.running_ranks)
            self._fenced |= {r for r in fenced if r not in self._lost}
            self._release(rec, now, f"abandoned: {reason}")
        if rec.cancel_requested:
            self._finish(rec, RequestState.CANCELLED, now)
            return
        r = rec.request
        rec.trajectory = Trajectory(request_id, r.num_inference_steps, self.chunk_steps)
        rec.layout = None
        rec.last_ranks = ()
        rec.state = RequestState.QUEUED if rec.num_tasks == 0 else RequestState.WAITING
        rec.runnable_since_s = now
        rec.num_reruns += 1
        rec.preempted = False
        logger.warning("request %s re-runs from its first task: %s", request_id, reason)

    def fail(self, request_id: str, reason: str, now: float, fence: Iterable[int] = ()) -> None:
        """Ends an unfinished request FAILED now, with `reason`. A task in flight is abandoned as in
        `rerun` (its ranks in `fence` stay busy until `unfence`)."""
        rec = self.record(request_id)
        if rec.state.is_terminal:
            return
        if rec.running is not None:
            self._fenced |= {r for r in set(fence) & set(rec.running_ranks) if r not in self._lost}
            self._release(rec, now, f"abandoned: {reason}")
        rec.error = reason
        self._finish(rec, RequestState.FAILED, now)
        logger.warning("request %s failed: %s", request_id, reason)

    def unfence(self, rank: int) -> None:
        """A rank fenced by `rerun` finished its abandoned task: free again (unless lost)."""
        self._fenced.discard(rank)

    # Decisions.

    def view(self, now: float) -> SchedulerView:
        """The read-only view the policy gets at time `now`."""
        runnable = []
        for rec in self._active.values():
            if rec.state not in (RequestState.QUEUED, RequestState.WAITING) or rec.request.arrival_s > now:
                continue
            runnable.append(self._runnable(rec))
        runnable.sort(key=lambda rt: (rt.request.arrival_s, -rt.request.priority))
        running = tuple(
            RunningTask(rec.running, rec.running_ranks, rec.history[-1].start_s, rec.expected_end_s)
            for rec in self._active.values()
            if rec.running is not None
        )
        return SchedulerView(
            now, self.world_size, self.free_ranks, tuple(runnable), running, self.cost_model, self.chunk_steps
        )

    def schedule(self, now: float) -> list[Assignment]:
        """Ask the policy what to start at `now` and commit it. Returns the assignments to dispatch,
        each with the task actually run (DENOISE with the chosen steps), `num_steps` set for DENOISE,
        and the reshard plan (None for ENCODE). Raises PolicyError, committing nothing, if the policy's
        output breaks the contract."""
        if not self.free_ranks:  # nothing can start: skip the view, a pass over every waiting request
            return []
        view = self.view(now)
        if not view.runnable:
            return []
        proposed = self.policy.schedule(view)
        self._validate(view, proposed)
        committed = [self._commit(a, now) for a in proposed]
        self._commit_batches(committed, now)
        owners: dict[int, set[str]] = {}
        for a in committed:
            for r in a.ranks:
                owners.setdefault(r, set()).add(a.task.request_id)
        for rt in view.runnable:
            rec = self._records[rt.request_id]
            if not rt.started or not any(
                rt.request_id not in owners.get(r, {rt.request_id}) for r in rt.last_ranks
            ):
                continue
            # Some of its last group's ranks went to another request: it waits (paused, counted once
            # per wait) or runs on other ranks (demoted or moved, counted per decision).
            if rec.running is None and not rec.preempted:
                rec.preempted = True
            elif rec.running is None:
                continue
            rec.num_preemptions += 1
            self.num_preemptions += 1
        return committed

    # Internals.

    def _runnable(self, rec: RequestRecord) -> RunnableTask:
        head = rec.trajectory.head()
        assert head is not None
        r, cost = rec.request, self.cost_model
        remaining = rec.trajectory.remaining_steps
        step_s, task_s, remaining_s = {}, {}, {}
        for d in rec.valid_degrees:
            step_s[d] = cost.step_time(r.model, r.width, r.height, r.num_frames, d)
            task_s[d] = cost.task_time(head, r, d)
            remaining_s[d] = cost.remaining_time(r, head, d, remaining)
        cfg_step_s = {}
        if runs_true_cfg(get_preset(r.model), r):
            for k in rec.valid_degrees:
                if 2 * k <= self.world_size:
                    cfg_step_s[2 * k] = cost.cfg_step_time(r.model, r.width, r.height, r.num_frames, k)
        return RunnableTask(
            task=head,
            request=r,
            started=bool(rec.last_ranks),  # a re-run (Scheduler.rerun) starts afresh
            remaining_steps=remaining,
            layout=rec.layout,
            dim_size=rec.dim_size,
            valid_degrees=rec.valid_degrees,
            last_ranks=rec.last_ranks,
            runnable_since_s=rec.runnable_since_s,
            task_s=MappingProxyType(task_s),
            step_s=MappingProxyType(step_s),
            remaining_s=MappingProxyType(remaining_s),
            cfg_step_s=MappingProxyType(cfg_step_s),
            solo=rec.solo,
        )

    def _validate(self, view: SchedulerView, proposed: object) -> None:
        name = getattr(self.policy, "name", type(self.policy).__name__)

        def fail(message: str) -> NoReturn:
            raise PolicyError(f"policy {name!r} at t={view.now_s:.6f}: {message}")

        if not isinstance(proposed, (list, tuple)):
            fail(f"schedule() must return a list of Assignment, got {type(proposed).__name__}")
        by_id = {rt.request_id: rt for rt in view.runnable}
        free = set(view.free_ranks)
        seen_requests: set[str] = set()
        taken: set[int] = set()
        batches: dict[int, Assignment] = {}  # batch tag -> its first member
        for a in proposed:
            if not isinstance(a, Assignment):
                fail(f"expected Assignment, got {type(a).__name__}")
            if not isinstance(a.task, Task):
                fail(f"Assignment.task must be a Task, got {type(a.task).__name__}")
            rt = by_id.get(a.task.request_id)
            if rt is None:
                fail(f"{a.task}: request {a.task.request_id!r} has no runnable task")
            if a.task != rt.task:
                fail(f"{a.task} is not the runnable task of its request ({rt.task})")
            if a.task.request_id in seen_requests:
                fail(f"request {a.task.request_id!r} assigned twice")
            seen_requests.add(a.task.request_id)
            if a.reshard is not None:
                fail(f"{a.task}: policies must leave `reshard` None (the scheduler fills it)")
            ranks = a.ranks
            if not ranks:
                fail(f"{a.task}: empty group")
            for r in ranks:
                if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < view.world_size:
                    fail(f"{a.task}: rank {r!r} is not in [0, {view.world_size})")
            if len(set(ranks)) != len(ranks):
                fail(f"{a.task}: duplicate ranks in {ranks}")
            if not set(ranks) <= free:
                fail(f"{a.task}: ranks {sorted(set(ranks) - free)} are busy")
            first = None
            if a.batch is not None:
                if not isinstance(a.batch, int) or isinstance(a.batch, bool):
                    fail(f"{a.task}: batch must be an int tag or None, got {a.batch!r}")
                if a.task.kind is not TaskKind.DENOISE:
                    fail(f"{a.task}: only DENOISE chunks run in batches")
                if not batchable(rt.request):
                    fail(f"{a.task}: model {rt.request.model!r} does not denoise in batches")
                first = batches.setdefault(a.batch, a)
            if first is not None and first is not a:
                if ranks != first.ranks:
                    fail(f"{a.task}: batch {a.batch} runs on {list(first.ranks)}, not {list(ranks)}")
                mine, theirs = batch_key(rt.request, 0), batch_key(by_id[first.task.request_id].request, 0)
                if (mine.model, mine.width, mine.height, mine.frames) != (
                    theirs.model,
                    theirs.width,
                    theirs.height,
                    theirs.frames,
                ):
                    fail(f"{a.task}: batch {a.batch} mixes models or shapes ({mine} vs {theirs})")
            else:
                if taken & set(ranks):
                    fail(f"{a.task}: ranks {sorted(taken & set(ranks))} already assigned in this decision")
                taken |= set(ranks)
            if a.cfg is not False:
                if a.cfg is not True:
                    fail(f"{a.task}: cfg must be a bool, got {a.cfg!r}")
                if a.task.kind is not TaskKind.DENOISE:
                    fail(f"{a.task}: only DENOISE chunks run CFG-parallel")
                if not rt.cfg_step_s:
                    fail(
                        f"{a.task}: request {rt.request_id!r} runs no true CFG, so it cannot run CFG-parallel"
                    )
                if len(ranks) not in rt.cfg_step_s:
                    fail(
                        f"{a.task}: CFG-parallel on {len(ranks)} ranks; sizes allowed: {sorted(rt.cfg_step_s)}"
                    )
                if a.batch is not None:
                    fail(f"{a.task}: CFG-parallel chunks are not batched")
            elif len(ranks) not in rt.valid_degrees:
                fail(f"{a.task}: group size {len(ranks)} is not a valid degree {rt.valid_degrees}")
            n = a.num_steps
            if a.task.kind is TaskKind.DENOISE:
                if n is not None and (not isinstance(n, int) or not 1 <= n <= rt.remaining_steps):
                    fail(f"{a.task}: num_steps {n!r} not in [1, {rt.remaining_steps}]")
            elif n not in (None, 0):
                fail(f"{a.task}: num_steps {n!r} given for a {a.task.kind.name} task")

    def _commit(self, a: Assignment, now: float) -> Assignment:
        rec = self._records[a.task.request_id]
        task = a.task
        if task.kind is TaskKind.DENOISE and a.num_steps is not None:
            task = Task(task.request_id, TaskKind.DENOISE, task.start, task.start + a.num_steps)
        ranks, r = a.ranks, rec.request
        needed = None
        if a.cfg:
            needed = _cfg_layout(ranks, self.state_dim)
        elif task.kind in (TaskKind.DENOISE, TaskKind.DECODE):
            needed = Layout.sharded(ranks, self.state_dim)
        plan = None
        num_bytes = 0
        if needed is not None and rec.layout is not None:
            plan = plan_reshard(rec.layout, needed, rec.dim_size)
            if not plan.is_noop:
                num_bytes = plan.bytes_moved(state_bytes_per_index(r, task.kind))
                rec.num_reshards += 1
                rec.elements_moved += plan.elements_moved
                rec.bytes_moved += num_bytes
        if rec.last_ranks and ranks != rec.last_ranks:
            rec.num_group_changes += 1
        compute = self.cost_model.task_time(task, r, len(ranks), cfg=a.cfg)
        estimate = self.cost_model.reshard_time(num_bytes) + compute
        rec.state = RequestState.RUNNING
        rec.running, rec.running_ranks = task, ranks
        rec.expected_end_s = now + estimate
        rec.last_ranks = ranks
        rec.num_tasks += 1
        rec.preempted = False
        if rec.first_start_s is None:
            rec.first_start_s = now
        rec.running_batch = ()
        rec.history.append(
            TaskRecord(task, ranks, now, elements_moved=plan.elements_moved if plan else 0, cfg=a.cfg)
        )
        for rank in ranks:
            self._busy.setdefault(rank, set()).add(task.request_id)
        logger.debug("t=%.6f dispatch %s on %s (moves %d bytes)", now, task, list(ranks), num_bytes)
        num_steps = task.num_steps if task.kind is TaskKind.DENOISE else None
        return Assignment(task, ranks, num_steps, plan, a.batch, a.cfg)

    def _commit_batches(self, committed: Sequence[Assignment], now: float) -> None:
        """Note [Batched chunks in the scheduler]: each member's batch, history size and estimated end."""
        by_tag: dict[int, list[Assignment]] = {}
        for a in committed:
            if a.batch is not None:
                by_tag.setdefault(a.batch, []).append(a)
        for members in by_tag.values():
            if len(members) < 2:
                continue
            tasks = tuple(a.task for a in members)
            recs = [self._records[t.request_id] for t in tasks]
            r = recs[0].request
            chunk_s = self.cost_model.batch_chunk_time(
                r.model, r.width, r.height, r.num_frames, len(members[0].ranks), [t.num_steps for t in tasks]
            )
            reshard_s = 0.0
            for a, rec in zip(members, recs, strict=True):
                moved = (
                    a.reshard.bytes_moved(state_bytes_per_index(rec.request, a.task.kind)) if a.reshard else 0
                )
                reshard_s = max(reshard_s, self.cost_model.reshard_time(moved))
            for rec in recs:
                rec.running_batch = tasks
                rec.history[-1].batch_size = len(tasks)
                rec.expected_end_s = now + reshard_s + chunk_s

    def _running_record(self, task: Task, ranks: Sequence[int]) -> RequestRecord:
        rec = self.record(task.request_id)
        if rec.running != task:
            raise ValueError(f"{task} is not running (running: {rec.running})")
        if tuple(ranks) != rec.running_ranks:
            raise ValueError(f"{task} runs on {list(rec.running_ranks)}, not {list(ranks)}")
        return rec

    def _release(self, rec: RequestRecord, end_s: float, outcome: str) -> None:
        rid = rec.request.request_id
        for rank in rec.running_ranks:
            owners = self._busy[rank]
            owners.discard(rid)
            if not owners:
                del self._busy[rank]
        last = rec.history[-1]
        last.end_s, last.outcome = end_s, outcome
        rec.running, rec.running_ranks, rec.expected_end_s = None, (), None
        rec.running_batch = ()

    def _finish(self, rec: RequestRecord, state: RequestState, now: float) -> None:
        rec.state = state
        rec.finish_s = now
        rec.layout = None
        rid = rec.request.request_id
        self._active.pop(rid, None)
        self._finished.append(rid)
        while self.keep_finished is not None and len(self._finished) > self.keep_finished:
            del self._records[self._finished.popleft()]
        logger.debug("request %s %s at t=%.6f", rec.request.request_id, state.value, now)
