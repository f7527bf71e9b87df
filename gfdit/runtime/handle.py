"""The handle API of the engine (rank 0): what `Engine.submit` returns, its progress and result.

A RequestHandle is written by the engine's control thread (`emit`, `finish`) and read by any other
thread (the HTTP server's event loop, a library caller). Cancelling posts a typed `Cancel` to the
control thread (gfdit.runtime.messages.Control); the handle never touches the engine's state.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gfdit.request import Request

from . import messages as msg

__all__ = ["Progress", "RequestHandle", "Result", "Status"]


class Status:
    """The one vocabulary of a request's status from the engine to HTTP (Progress.state, the
    server's job status and its SSE events all use these strings)."""

    QUEUED = "queued"  # accepted, no task started yet
    IN_PROGRESS = "in_progress"  # a task started (also between tasks, and while it re-runs)
    COMPLETED = "completed"  # the result is there
    FAILED = "failed"  # ended with an error (the handle's error says why)
    CANCELLED = "cancelled"  # cancelled by its client or the server

    TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
    ALL = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)


@dataclass
class Result:
    """A finished request."""

    images: np.ndarray  # uint8, [N, H, W, 3] (images) or [N, F, H, W, 3] (video frames)
    latency_s: float  # submit to result
    queue_s: float  # submit to first task start
    reshard_s: float  # time the request's tasks spent moving state between ranks (max over members)
    bytes_moved: int  # bytes its reshards received, over all ranks
    num_reshards: int  # tasks that first moved state
    groups: list[tuple[str, tuple[int, ...]]]  # (task, ranks) of every task, in order
    latents: np.ndarray | None = None  # the final latent [1, S, C] (float32), with keep_latents
    num_reruns: int = 0  # times it restarted from its first task after a rank was lost
    chunk_batch_sizes: list[int] = field(default_factory=list)  # members of each DENOISE chunk's batch
    chunk_cfg: list[bool] = field(default_factory=list)  # whether each DENOISE chunk ran CFG-parallel


@dataclass
class Progress:
    """One progress event (also kept as the handle's latest)."""

    state: str  # a Status value
    step: int  # denoising steps done
    num_steps: int  # total denoising steps
    degree: int  # size of the group of the last task
    task: str = ""  # the last task that finished or started


class RequestHandle:
    """Returned by Engine.submit (rank 0): progress, result, cancel. `post(control)` hands a typed
    control message to the engine's control thread."""

    def __init__(self, post: Callable[[msg.Control], None], request: Request):
        self._post = post
        self.request = request
        self.request_id = request.request_id
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: str | None = None
        self._progress = Progress(Status.QUEUED, 0, request.num_inference_steps, 0)
        self._listeners: list[queue.Queue] = []
        self._lock = threading.Lock()

    def progress(self) -> Progress:
        return self._progress

    def subscribe(self, sink=None) -> queue.Queue:
        """A queue that receives every later Progress event; the last one has a terminal state, and
        once it is there, result() returns without waiting. `sink`: use this object instead of a new
        queue.Queue: anything with a put(progress) that never blocks (e.g. an adapter into an
        asyncio loop); it is called on the engine's control thread, and returned."""
        q = sink if sink is not None else queue.Queue()
        with self._lock:
            self._listeners.append(q)
            if self._done.is_set():
                q.put(self._progress)
        return q

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """Blocks until the request ends. Raises RuntimeError with the reason if it failed or was
        cancelled, TimeoutError if `timeout` passes first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"request {self.request_id} {self._progress.state}: {self._error}")
        return self._result

    def cancel(self) -> None:
        """Asks to cancel; the ranks are freed at the next rescheduling point."""
        self._post(msg.Cancel(self.request_id))

    @property
    def error(self) -> str | None:
        return self._error

    # -- written by the engine's control thread only ----------------------------------------------
    def emit(self, p: Progress) -> None:
        """Publishes a non-terminal progress event (engine side)."""
        with self._lock:
            if self._done.is_set():
                return
            self._progress = p
            for q in self._listeners:
                q.put(p)

    def update(self, **changes) -> None:
        """Publishes the latest progress with `changes` (engine side)."""
        self.emit(dataclasses.replace(self._progress, **changes))

    def finish(self, result: Result | None, error: str | None, state: str) -> None:
        """Ends the request once (engine side); later calls do nothing. Done is set before the
        terminal event goes out: a listener that gets it can call result() at once."""
        if state not in Status.TERMINAL:
            raise ValueError(f"finish: {state!r} is not a terminal status")
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            self._progress = p = dataclasses.replace(self._progress, state=state)
            self._done.set()
            for q in self._listeners:
                q.put(p)
