"""The watchdog of rank 0: tasks in flight, their time limits, and which ranks are hung.

Note [Hung ranks]
~~~~~~~~~~~~~~~~~
A task in flight has a limit: max(floor, factor x the cost model's estimate). A rank that has not
reported a task `grace_s` after that limit is hung. The grace is what a healthy member needs to
notice a hung peer by itself: members blocked in a collective with a stopped process end with
gfcoll's timeout error (GFCOLL_TIMEOUT_S) and report it, so they are not mistaken for the hung
one; the engine passes a grace of at least that timeout. A task may be abandoned (its request
re-runs elsewhere after a peer failure): its members that have not reported stay tracked, and
fenced from new work, until they report, or until the clock calls them hung.
Rank 0 is never reported hung: its worker runs in the engine's process, and if that is stuck the
engine cannot serve anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import messages as msg

__all__ = ["Inflight", "Watchdog"]


@dataclass
class Inflight:
    """A task in flight (or abandoned, with members still running it)."""

    task_id: int  # the engine's id of the task (msg.Task.task_id)
    assignment: object  # the scheduler's Assignment
    start_s: float  # dispatch time, engine clock
    limit_s: float  # running longer than this (plus the grace): the members still waiting are hung
    waiting: set[int]  # members that have not reported yet
    events: list[msg.Done] = field(default_factory=list)  # the members' Done events so far
    abandoned: bool = False  # its request moved on (re-run); reports only unfence their ranks


class Watchdog:
    """Tracks tasks in flight and their limits (Note [Hung ranks]). Control thread only."""

    def __init__(self, floor_s: float | None, factor: float, grace_s: float):
        if floor_s is not None and not floor_s > 0:
            raise ValueError(f"task timeout floor must be > 0 or None, got {floor_s}")
        if not factor > 0:
            raise ValueError(f"task timeout factor must be > 0, got {factor}")
        if not grace_s >= 0:
            raise ValueError(f"grace must be >= 0, got {grace_s}")
        self.floor_s = floor_s  # None: no clock check at all
        self.factor = factor
        self.grace_s = grace_s
        self._tasks: dict[int, Inflight] = {}
        self._flagged: set[int] = set()  # ranks already reported hung

    def start(self, task_id: int, assignment, now: float, expected_s: float, members) -> Inflight:
        limit = max(self.floor_s or 0.0, self.factor * max(0.0, expected_s))
        inf = Inflight(task_id, assignment, now, limit, set(members))
        self._tasks[task_id] = inf
        return inf

    def get(self, task_id: int) -> Inflight | None:
        return self._tasks.get(task_id)

    def pop(self, task_id: int) -> Inflight | None:
        return self._tasks.pop(task_id, None)

    def running(self) -> list[Inflight]:
        """The tasks not abandoned."""
        return [inf for inf in self._tasks.values() if not inf.abandoned]

    def all(self) -> list[Inflight]:
        return list(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def hung(self, now: float) -> list[tuple[int, Inflight]]:
        """(rank, task) for every non-zero rank newly found hung (Note [Hung ranks])."""
        if self.floor_s is None:
            return []
        out = []
        for inf in self._tasks.values():
            if now - inf.start_s <= inf.limit_s + self.grace_s:
                continue
            for r in sorted(inf.waiting):
                if r != 0 and r not in self._flagged:
                    self._flagged.add(r)
                    out.append((r, inf))
        return out

    def next_deadline_s(self, now: float) -> float | None:
        """Seconds until the next task could be found hung, or None without tasks or a clock."""
        if self.floor_s is None or not self._tasks:
            return None
        return max(0.0, min(inf.start_s + inf.limit_s + self.grace_s - now for inf in self._tasks.values()))
