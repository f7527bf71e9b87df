"""Scheduling policies: the pluggable decision of which task runs where, on how many ranks.

A `Policy` sees a read-only `SchedulerView` (free ranks, runnable tasks with their request metadata
and cost estimates, running tasks) and returns `Assignment`s. It is called by the `Scheduler` at every
rescheduling point, both in the server and in the simulator (`gfdit.sim`). Contract of `schedule`:
  - every assignment names a task that is in `view.runnable` (as given, `RunnableTask.task`), at most
    one per request;
  - its ranks are free, distinct, in [0, world_size), disjoint from the other assignments' ranks;
  - the group size is one of `RunnableTask.valid_degrees` (FINALIZE: exactly one rank);
  - DENOISE may set `num_steps` (1..remaining_steps) to run more or fewer steps than listed;
  - a runnable request that gets nothing simply waits (preemption): its state stays where it is;
  - it must not mutate the view. The Scheduler validates the output and raises PolicyError otherwise.
Built-ins prefer the ranks that already hold a request's state (`choose_ranks_for_reuse`).
`make_policy("edf-best-fit:chunk=2,max_sp=4")` builds one from a spec string.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

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
    "place",
    "state_holders",
]


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


@dataclass(frozen=True)
class Assignment:
    """A decision: run `task` on `ranks`. Policies fill the first three fields."""

    task: Task  # the runnable task (RunnableTask.task); the Scheduler returns the task actually run
    ranks: tuple[int, ...]  # ordered group (see Note [State layout between tasks] in gfdit.scheduler)
    num_steps: int | None = None  # DENOISE: steps to run from task.start; None: as listed; else None
    reshard: ReshardPlan | None = None  # set by the Scheduler: how the state moves onto `ranks`

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


def _steps(rt: RunnableTask, chunk: int) -> int | None:
    if rt.kind is not TaskKind.DENOISE:
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


def _assign_greedily(
    view: SchedulerView, order: Sequence[RunnableTask], max_sp: int, chunk: int, tol: float
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


def _convert(policy: str, key: str, kind: type, text: str) -> object:
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


def _validate_common(p: Policy, chunk: int, max_sp: int, tol: float) -> None:
    _check(p.name, chunk >= 0, f"chunk must be >= 0 (0: all remaining steps), got {chunk}")
    _check(p.name, max_sp >= 0, f"max_sp must be >= 0 (0: world size), got {max_sp}")
    _check(p.name, 0.0 <= tol < 1.0 and math.isfinite(tol), f"tol must be in [0, 1), got {tol}")


# Built-in policies.


@register_policy
@dataclass
class StaticPolicy(Policy):
    """Baseline: every request gets a fixed group of `sp` ranks (the largest valid degree <= sp) when
    it starts and keeps it, reserved, for its whole life; all its tasks run on that group (FINALIZE on
    the group's first rank). Groups are aligned blocks [k*sp, (k+1)*sp) when one is free. FCFS."""

    name: ClassVar[str] = "static"
    sp: int = 1  # SP degree of every request
    chunk: int = 0  # DENOISE steps per task; 0: all remaining steps in one task

    def __post_init__(self) -> None:
        _check(self.name, self.sp >= 1, f"sp must be >= 1, got {self.sp}")
        _check(self.name, self.chunk >= 0, f"chunk must be >= 0 (0: all remaining steps), got {self.chunk}")

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        free = set(view.free_ranks)
        reserved = {r for t in view.running for r in t.ranks}
        reserved |= {r for rt in view.runnable if rt.started for r in rt.last_ranks}
        out = []
        for rt in view.runnable:
            if rt.started:
                group = rt.last_ranks[:1] if rt.kind is TaskKind.FINALIZE else rt.last_ranks
                if set(group) <= free:
                    free -= set(group)
                    out.append(Assignment(rt.task, group, _steps(rt, self.chunk)))
        for rt in view.runnable:
            if rt.started:
                continue
            d = max(x for x in rt.valid_degrees if x <= self.sp)
            available = sorted(free - reserved)
            if len(available) < d:
                continue
            blocks = [tuple(range(s, s + d)) for s in range(0, view.world_size - d + 1, d)]
            group = next((b for b in blocks if set(b) <= set(available)), tuple(available[:d]))
            if rt.kind is TaskKind.FINALIZE:  # a request submitted straight at FINALIZE (not normal)
                group = group[:1]
            free -= set(group)
            reserved |= set(group)
            out.append(Assignment(rt.task, group, _steps(rt, self.chunk)))
        return out


@register_policy
@dataclass
class FcfsElasticPolicy(Policy):
    """First come first served; each DENOISE chunk gets the smallest valid degree whose step time is
    within `tol` of the fastest degree that fits the free ranks and `max_sp`; other tasks one rank."""

    name: ClassVar[str] = "fcfs-elastic"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int = 2  # DENOISE steps per task; 0: all remaining steps
    tol: float = 0.05  # relative step-time gain below which more ranks are not worth taking

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        order = sorted(view.runnable, key=lambda rt: (rt.request.arrival_s, -rt.request.priority))
        return _assign_greedily(view, order, self.max_sp, self.chunk, self.tol)


@register_policy
@dataclass
class SrtfPolicy(Policy):
    """Shortest remaining time first (estimated at degree 1), re-decided at every rescheduling point,
    so a long request waits (is preempted) between chunks while shorter ones run. Degrees as in
    fcfs-elastic."""

    name: ClassVar[str] = "srtf"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int = 2  # DENOISE steps per task; 0: all remaining steps
    tol: float = 0.05  # relative step-time gain below which more ranks are not worth taking

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        order = sorted(view.runnable, key=lambda rt: (rt.remaining_s[1], rt.request.arrival_s))
        return _assign_greedily(view, order, self.max_sp, self.chunk, self.tol)


@register_policy
@dataclass
class EdfBestFitPolicy(Policy):
    """Earliest deadline first with best-fit degrees.

    Order: requests that can still meet their deadline (earliest first), then requests without one
    (by arrival), then, if `hopeless_last`, those that cannot meet it at any degree (earliest first).
    Pass 1: in that order, each DENOISE chunk asks for the smallest valid degree whose estimated
    finish (now + margin * remaining seconds) meets the deadline (degree 1 without a deadline or when
    hopeless), and gets the largest valid degree <= that which the free ranks still allow; other tasks
    get one rank. Pass 2: spare ranks are spread, in the same order, one degree step at a time, to
    DENOISE chunks whose step time drops by more than `tol`.
    """

    name: ClassVar[str] = "edf-best-fit"
    max_sp: int = 0  # largest SP degree; 0: world size
    chunk: int = 2  # DENOISE steps per task; 0: all remaining steps
    tol: float = 0.05  # relative step-time gain below which spare ranks are not given
    margin: float = 1.0  # multiplier on remaining-time estimates when testing a deadline
    hopeless_last: bool = True  # serve requests that cannot meet their deadline after all others

    def __post_init__(self) -> None:
        _validate_common(self, self.chunk, self.max_sp, self.tol)
        _check(
            self.name, self.margin > 0 and math.isfinite(self.margin), f"margin must be > 0: {self.margin}"
        )

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        cap = self.max_sp or view.world_size
        now = view.now_s

        def degrees(rt: RunnableTask) -> list[int]:
            return [d for d in rt.valid_degrees if d <= cap] or [1]

        def meets(rt: RunnableTask, d: int) -> bool:
            deadline = rt.request.deadline_s
            return deadline is None or now + self.margin * rt.remaining_s[d] <= deadline

        def urgency(rt: RunnableTask) -> tuple:
            deadline = rt.request.deadline_s
            if deadline is None:
                group = 1
            elif self.hopeless_last and not any(meets(rt, d) for d in degrees(rt)):
                group = 2
            else:
                group = 0
            return (group, deadline if deadline is not None else math.inf, rt.request.arrival_s)

        order = sorted(view.runnable, key=urgency)
        spare = len(view.free_ranks)
        chosen: list[list] = []  # [runnable task, degree]
        for rt in order:
            if spare == 0:
                break
            d = 1
            if rt.kind is TaskKind.DENOISE:
                fits = [x for x in degrees(rt) if meets(rt, x)] if rt.request.deadline_s is not None else []
                want = fits[0] if fits else 1
                d = max(x for x in degrees(rt) if x <= min(want, spare))
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
                    for x in degrees(rt)
                    if d < x <= d + spare and rt.step_s[x] < rt.step_s[d] * (1.0 - self.tol)
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
            out.append(Assignment(rt.task, ranks, _steps(rt, self.chunk)))
        return out
