"""A generation request and its lifecycle state.

Pure Python, no torch: the scheduler, the policies and the simulator all read these objects.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Request", "RequestState"]


class RequestState(enum.Enum):
    """Where a request is in its life. DONE, FAILED and CANCELLED are terminal."""

    QUEUED = "queued"  # submitted; none of its tasks has run yet
    RUNNING = "running"  # one of its tasks is executing on a group of ranks
    WAITING = "waiting"  # between two tasks (a rescheduling point); its state stays where it is
    DONE = "done"  # DECODE completed: the result went to the front end
    FAILED = "failed"  # a task failed and was not retried; the record says why
    CANCELLED = "cancelled"  # cancelled by the client or the server

    @property
    def is_terminal(self) -> bool:
        return self in (RequestState.DONE, RequestState.FAILED, RequestState.CANCELLED)


@dataclass(frozen=True)
class Request:
    """One image or video generation request, as the scheduler sees it (immutable).

    Times are seconds on the scheduler's clock (the server's monotonic clock, or the simulated clock).
    Construction validates the fields and raises ValueError with the offending field's name.
    """

    request_id: str  # unique id, chosen by the front end
    model: str  # model preset name, e.g. "flux-dev", "wan2.1-1.3b" (see gfdit.cost.MODEL_PROFILES)
    prompt: str = ""  # text prompt
    negative_prompt: str | None = None  # negative prompt (classifier-free guidance), None for none
    width: int = 1024  # output width in pixels
    height: int = 1024  # output height in pixels
    num_frames: int | None = None  # output frames for video; None for an image
    num_inference_steps: int = 28  # denoising steps of the noise scheduler
    guidance_scale: float = 3.5  # guidance strength (distilled guidance for Flux, CFG for Wan)
    seed: int | None = None  # RNG seed of the initial noise; None: the server picks one
    deadline_s: float | None = None  # absolute time by which the result is wanted; None: best effort
    priority: int = 0  # larger is more important; policies may use it to break ties
    arrival_s: float = 0.0  # absolute time the request was accepted
    preemptible: bool = False  # policies may pause or demote it at a chunk boundary for other work
    slo_class: str = ""  # workload class label (e.g. "S", "M", "L"; "" for none): per-class policies, metrics

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in ("width", "height", "num_inference_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_frames is not None and (
            not isinstance(self.num_frames, int) or isinstance(self.num_frames, bool) or self.num_frames < 1
        ):
            raise ValueError(f"num_frames must be None or a positive integer, got {self.num_frames!r}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale!r}")
        if not math.isfinite(self.arrival_s):
            raise ValueError(f"arrival_s must be finite, got {self.arrival_s!r}")
        if not isinstance(self.preemptible, bool):
            raise ValueError(f"preemptible must be a bool, got {self.preemptible!r}")
        if not isinstance(self.slo_class, str):
            raise ValueError(f"slo_class must be a string, got {self.slo_class!r}")
        if self.deadline_s is not None and not math.isfinite(self.deadline_s):
            raise ValueError(f"deadline_s must be None or finite, got {self.deadline_s!r}")

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    @property
    def num_pixels(self) -> int:
        """Output pixels, all frames together."""
        return self.width * self.height * (self.num_frames or 1)
