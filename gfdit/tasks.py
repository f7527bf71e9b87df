"""Trajectory tasks: the units a request is cut into.

A request runs as ENCODE -> DENOISE(steps [0, c)) -> DENOISE([c, 2c)) ... -> DECODE. The
boundary after every task is a rescheduling point: the next task may run on a different group of ranks
(with a different sequence-parallel degree), or wait. Tasks are never interrupted once started.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from gfdit.request import Request

__all__ = ["TaskKind", "Task", "TaskTimings", "Trajectory", "make_trajectory"]


class TaskKind(enum.Enum):
    ENCODE = "encode"  # text encoders; also draws the initial noise latent
    DENOISE = "denoise"  # a chunk of denoising steps of the transformer
    DECODE = "decode"  # VAE decode of the final latent into pixels, handed to the front end
    # (A FINALIZE stage that moved the pixels and copied them to the host was folded into DECODE: it
    # did no work of its own; the front end encodes PNG/MP4 on rank 0.)


@dataclass(frozen=True)
class Task:
    """One task of one request. Hashable; (request_id, kind, start) identifies it within a run."""

    request_id: str  # the request this task belongs to
    kind: TaskKind  # what the task does
    start: int = 0  # DENOISE: first step of the chunk; 0 for the other kinds
    end: int = 0  # DENOISE: one past the last step of the chunk (start < end); 0 for the other kinds

    def __post_init__(self) -> None:
        if self.kind is TaskKind.DENOISE:
            if not (0 <= self.start < self.end):
                raise ValueError(f"DENOISE task needs 0 <= start < end, got [{self.start}, {self.end})")
        elif self.start != 0 or self.end != 0:
            raise ValueError(f"{self.kind.name} task has no step range, got [{self.start}, {self.end})")

    @property
    def num_steps(self) -> int:
        """Denoising steps this task runs (0 for non-DENOISE tasks)."""
        return self.end - self.start

    def __str__(self) -> str:
        if self.kind is TaskKind.DENOISE:
            return f"{self.request_id}:denoise[{self.start},{self.end})"
        return f"{self.request_id}:{self.kind.value}"


@dataclass(frozen=True)
class TaskTimings:
    """What a worker reports about a finished task (scheduler clock, seconds)."""

    start_s: float  # the task started (including its reshard)
    end_s: float  # the task finished
    reshard_s: float = 0.0  # part of [start_s, end_s) spent moving state to the group

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)) or self.end_s < self.start_s:
            raise ValueError(f"bad timings: start {self.start_s}, end {self.end_s}")
        if not (0.0 <= self.reshard_s <= self.end_s - self.start_s + 1e-12):
            raise ValueError(f"reshard_s {self.reshard_s} outside [0, {self.end_s - self.start_s}]")

    @property
    def compute_s(self) -> float:
        """Time spent on the task itself, reshard excluded."""
        return max(0.0, self.end_s - self.start_s - self.reshard_s)


class Trajectory:
    """The remaining tasks of one request, as a cursor (not thread-safe; owned by the Scheduler).

    `head()` is the next task with DENOISE chunks of `chunk_steps` steps. The chunking is only the default:
    `advance(task)` accepts a DENOISE task of any length that starts at the cursor, so a policy may run
    more or fewer steps at a time, and the rest is re-chunked from where it stopped.
    """

    def __init__(self, request_id: str, num_steps: int, chunk_steps: int = 2) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        self.request_id = request_id
        self.num_steps = num_steps
        self.chunk_steps = chunk_steps
        self._kind: TaskKind | None = TaskKind.ENCODE  # None once DECODE is done
        self._next_step = 0

    @property
    def next_step(self) -> int:
        """First denoising step not yet done."""
        return self._next_step

    @property
    def remaining_steps(self) -> int:
        return self.num_steps - self._next_step

    @property
    def finished(self) -> bool:
        return self._kind is None

    def head(self) -> Task | None:
        """The next task to run, or None when the trajectory is finished."""
        if self._kind is None:
            return None
        if self._kind is TaskKind.DENOISE:
            end = min(self._next_step + self.chunk_steps, self.num_steps)
            return Task(self.request_id, TaskKind.DENOISE, self._next_step, end)
        return Task(self.request_id, self._kind)

    def advance(self, task: Task) -> None:
        """Mark `task` done. It must be the head, or for DENOISE any chunk starting at the cursor."""
        head = self.head()
        if head is None:
            raise ValueError(f"trajectory of {self.request_id} is finished; cannot advance past {task}")
        if task.request_id != self.request_id or task.kind is not head.kind:
            raise ValueError(f"{task} is not the next task of {self.request_id} (next: {head})")
        if task.kind is TaskKind.DENOISE:
            if task.start != self._next_step or task.end > self.num_steps:
                raise ValueError(
                    f"{task} does not continue {self.request_id} at step {self._next_step} "
                    f"of {self.num_steps}"
                )
            self._next_step = task.end
            if self._next_step == self.num_steps:
                self._kind = TaskKind.DECODE
            return
        self._kind = {
            TaskKind.ENCODE: TaskKind.DENOISE,
            TaskKind.DECODE: None,
        }[task.kind]


def make_trajectory(request: Request, chunk_steps: int = 2) -> list[Task]:
    """The default task chain of `request`: ENCODE, DENOISE chunks of `chunk_steps` (the last one may be
    shorter), DECODE."""
    trajectory = Trajectory(request.request_id, request.num_inference_steps, chunk_steps)
    tasks = []
    while (task := trajectory.head()) is not None:
        tasks.append(task)
        trajectory.advance(task)
    return tasks
