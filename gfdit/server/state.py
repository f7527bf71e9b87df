"""What the HTTP front end keeps on rank 0: admission, every accepted engine request until it ends,
video jobs, metrics, and the drain on shutdown.

Note [Accepted requests end]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An engine request is *accepted* once Engine.submit returns its handle; from then on the engine
ends it completed, failed (with a reason: a task error, a dead rank, shutdown) or cancelled. The
server subscribes to every handle as it is accepted, with a sink that carries the engine's
Progress events into the event loop (`_Sink`), so that each request's end is seen exactly once
whatever its HTTP client does: metrics are recorded and the engine drops its handle then, a video
job moves to completed/failed, an image response or stream gets its result or its error. Nothing
waits on a handle in a thread. n images are n engine requests, accepted all or none (capacity is
checked first; a failure half-way cancels those already accepted). On SIGTERM, `drain` stops
admission, gives accepted requests `drain_s` to finish, then closes the engine, which fails what is
left with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from gfdit.request import Request
from gfdit.runtime.handle import Status

from .errors import ApiError, field_of_message
from .metrics import ServerMetrics
from .schemas import ImageGenerationRequest, VideoCreateRequest, kQualitySteps

__all__ = [
    "ServerConfig",
    "ServerState",
    "Tracked",
    "VideoJobState",
    "default_max_request_cost",
    "kDefaultMaxRequestCost",
    "kTerminal",
    "request_cost",
]

log = logging.getLogger("gfdit.server")

kTerminal = Status.TERMINAL  # Progress.state values that end a request

# Note [Request cost]
# ~~~~~~~~~~~~~~~~~~~
# What one HTTP call may ask of the GPUs, in megapixel-steps: width x height x frames x steps x n
# / 10^6 (frames 1 for images, n 1 for videos); a call above the limit gets 400 naming it, so one
# request cannot hold every rank for hours. Defaults per model (gfdit.serve --max-request-cost
# overrides; 0 disables), from the per-step times in DESIGN.md (one H100, eager):
#   flux-dev     1000: ~0.18-0.21 s per MP-step, so <= ~3.5 min of one GPU; covers n=4 at 2048x2048 x 50 steps
#   wan2.1-1.3b  8000: ~0.02-0.034 s per MP-step, <= ~4.5 min of one GPU; 720p x 81 frames x 100 steps
#   wan2.1-14b   4000: ~0.1-0.17 s per MP-step, <= ~11 min of one GPU; 720p x 81 frames x 50 steps
#   qwen-image    400: estimated (not measured), ~0.5-1 s per MP-step with its two CFG passes of a 20 B
#                      transformer; covers n=4 at 1328x1328 x 50 steps
#   wan2.2-t2v-a14b 4000: one Wan2.1-14B-sized expert per step, as wan2.1-14b
#   wan2.2-ti2v-5b 8000: estimated (not measured): 16x VAE, a quarter of Wan2.1's tokens per pixel;
#                      covers 1280x704 x 121 frames x 50 steps (5451)
#   tiny-*         64: CPU test presets: the largest size x 200 steps x n=4 (tiny-flux 52.4)
# Any other preset: 4 x its largest output at its default steps.
kDefaultMaxRequestCost = {
    "flux-dev": 1000.0,
    "wan2.1-1.3b": 8000.0,
    "wan2.1-14b": 4000.0,
    "qwen-image": 400.0,
    "wan2.2-t2v-a14b": 4000.0,
    "wan2.2-ti2v-5b": 8000.0,
    "tiny-flux": 64.0,
    "tiny-wan": 64.0,
    "tiny-qwen-image": 64.0,
    "tiny-wan2.2": 64.0,
    "tiny-wan2.2-ti2v": 64.0,
}


def default_max_request_cost(preset) -> float:
    """The default limit of one call's cost for a model preset (Note [Request cost])."""
    if preset.name in kDefaultMaxRequestCost:
        return kDefaultMaxRequestCost[preset.name]
    return 4 * preset.max_width * preset.max_height * max(1, preset.max_frames) * preset.default_steps / 1e6


def request_cost(requests: list[Request]) -> float:
    """Megapixel-steps of the engine requests of one call (Note [Request cost])."""
    return sum(r.width * r.height * (r.num_frames or 1) * r.num_inference_steps for r in requests) / 1e6


@dataclass(frozen=True)
class ServerConfig:
    """Front-end settings (the engine's are the Engine's arguments)."""

    policy: str = ""  # the policy as the operator named it, reported by /health
    max_steps: int = 100  # most num_inference_steps a request may ask for
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    drain_s: float = 20.0  # on SIGTERM, how long accepted requests get to finish before they fail
    max_finished_jobs: int = 256  # finished video jobs (and their mp4s) kept for GET; the oldest go first
    max_request_cost: float | None = (
        None  # megapixel-steps one call may ask for; None: the model's default, 0: none
    )
    api_key: str | None = field(default=None, repr=False)  # /v1/* requires `Bearer <key>`; None: open
    protect_metrics: bool = False  # /metrics also requires the key


@dataclass
class Tracked:
    """One accepted engine request and where its events go."""

    handle: object  # gfdit.runtime.engine.RequestHandle
    kind: str  # "image" or "video"
    index: int  # its position among the requests of one HTTP call (image n)
    events: asyncio.Queue  # (index, Progress) in order; shared by the requests of one HTTP call
    ended: bool = False  # its terminal event was handled


@dataclass
class VideoJobState:
    """A video job: one engine request, its status and, once completed, its mp4."""

    id: str  # "video_<hex>"
    tracked: Tracked  # its engine request
    request: Request  # as submitted
    fps: int  # frames per second of the mp4
    created_at: int  # Unix seconds
    status: str = Status.QUEUED  # queued | in_progress | completed | failed
    progress: int = 0  # 0-100
    completed_at: int | None = None  # Unix seconds
    error: dict | None = None  # {"code", "message"} when failed
    content: bytes | None = None  # the mp4, once completed
    info: dict | None = None  # GenerationInfo fields, once completed
    requested_seconds: str | None = None  # the body's `seconds`, when it gave one
    deleted: bool = False  # DELETE came: no content is kept; forgotten once finished, unless cancelled
    watcher: asyncio.Task | None = field(default=None, repr=False)  # consumes its events


class _Sink:
    """Engine -> event loop: RequestHandle.subscribe(sink=...) calls put() on the engine's control
    thread; the event is handled on the loop. Never blocks; a closed loop drops the event (the
    server is gone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback):
        self._loop = loop
        self._callback = callback

    def put(self, progress) -> None:
        try:
            self._loop.call_soon_threadsafe(self._callback, progress)
        except RuntimeError:
            pass


_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


class ServerState:
    """Rank 0's front end over an Engine. Methods run on the event loop unless they say otherwise."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.preset = engine.model.preset
        self.model_name = engine.model_name
        self.started_at = int(time.time())
        self.draining = False
        self.metrics = ServerMetrics(engine, self.health)
        self.jobs: OrderedDict[str, VideoJobState] = OrderedDict()
        self._active: dict[str, Tracked] = {}  # request id -> Tracked, until its end is handled
        self._latency_ema_s: float | None = None  # for Retry-After
        self._drain_lock = threading.Lock()
        self._drained = False  # drain() closed the engine
        self.drain_failed = 0  # accepted requests still running when the drain closed the engine
        limit = config.max_request_cost
        self.max_request_cost = default_max_request_cost(self.preset) if limit is None else float(limit)

    # -- health --------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(admits work, reason). Any thread."""
        if self.draining:
            return False, "shutting down"
        return self.engine.healthy()

    def health_report(self) -> tuple[str, str, list]:
        """(status, reason, ranks) for /health: status "ok" | "degraded" (both admit work) |
        "draining" | "unavailable"; ranks the engine's RankInfo list. Any thread."""
        h = self.engine.health()
        if self.draining:
            return "draining", "shutting down", h.ranks
        return h.status, h.reason, h.ranks

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- building engine requests --------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _size(self, size: str | None) -> tuple[int, int]:
        p = self.preset
        if size is None or size == "auto":
            if p.default_size is not None:
                w, h = p.default_size
            elif p.is_video:
                w, h = 832, 480
            else:
                w = h = 1024
            m = p.size_multiple
            w = min(max(w, p.min_width), p.max_width) // m * m
            h = min(max(h, p.min_height), p.max_height) // m * m
            return w, h
        match = _SIZE.match(size)
        if match is None:
            raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '64x64'), got {size!r}", param="size")
        return int(match.group(1)), int(match.group(2))

    def _steps(self, steps: int | None) -> int:
        steps = self.preset.default_steps if steps is None else steps
        if steps > self.config.max_steps:
            raise ApiError(
                400,
                f"num_inference_steps must be at most {self.config.max_steps} on this server, got {steps}",
                param="num_inference_steps",
                code="invalid_value",
            )
        return steps

    def _deadline(self, slo_ms: float | None) -> float | None:
        return None if slo_ms is None else self.engine.now() + slo_ms / 1000.0

    def _request(self, **kwargs) -> Request:
        try:
            request = Request(model=self.model_name, **kwargs)
            self.engine.model.validate(request)
        except ValueError as e:
            raise ApiError(400, str(e), param=field_of_message(str(e)), code="invalid_value") from None
        return request

    def check_cost(self, requests: list[Request]) -> None:
        """ApiError 400 naming the limit if the call costs more than --max-request-cost allows."""
        cost = request_cost(requests)
        if self.max_request_cost > 0 and cost > self.max_request_cost:
            raise ApiError(
                400,
                f"this request costs {cost:.4g} megapixel-steps (width x height x frames x steps x n / 1e6), "
                f"more than this server's limit of {self.max_request_cost:g} (--max-request-cost)",
                code="request_too_costly",
            )

    def image_requests(self, body: ImageGenerationRequest) -> list[Request]:
        """The n engine requests of an image call; ApiError (4xx naming the field) if invalid."""
        self._check_model(body.model)
        if self.preset.is_video:
            raise ApiError(
                400,
                f"{self.model_name} is a video model: use POST /v1/videos",
                param="model",
                code="unsupported_model",
            )
        self._check_image_output(body)
        width, height = self._size(body.size)
        steps = body.num_inference_steps
        if steps is None and body.quality in kQualitySteps:
            steps = max(1, round(self.preset.default_steps * kQualitySteps[body.quality]))
        steps = self._steps(steps)
        guidance = self.preset.default_guidance if body.guidance_scale is None else body.guidance_scale
        seed = random.randrange(2**31) if body.seed is None else body.seed
        deadline = self._deadline(body.slo_ms)
        base = f"img-{uuid.uuid4().hex[:16]}"
        requests = [
            self._request(
                request_id=f"{base}-{i}",
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=float(guidance),
                seed=seed + i,
                deadline_s=deadline,
                priority=body.priority,
                preemptible=body.preemptible,
                slo_class=body.slo_class or "",
            )
            for i in range(body.n)
        ]
        self.check_cost(requests)
        return requests

    @staticmethod
    def _check_image_output(body: ImageGenerationRequest) -> None:
        """OpenAI parameters gf-dit cannot honour: a 400 saying why (the README's table lists all)."""

        def refuse(param: str, why: str) -> None:
            raise ApiError(400, f"{param}: {why}", param=param, code="unsupported_value")

        if body.response_format == "url":
            refuse("response_format", "'url' is not supported: gf-dit keeps no image store; use 'b64_json'")
        if body.output_format in ("gif", "svg"):
            refuse("output_format", f"{body.output_format!r} is not produced; use png, jpeg or webp")
        for name in ("frame_count", "frame_duration_ms", "svg"):
            if getattr(body, name) is not None:
                refuse(name, "only for GIF or SVG output, which gf-dit does not produce")
        if body.background == "transparent":
            refuse("background", "'transparent' is not supported: the models make opaque RGB images")
        if body.partial_images:
            refuse(
                "partial_images",
                "partial images are not produced; `stream: true` sends progress events per step instead",
            )

    def video_request(self, body: VideoCreateRequest) -> Request:
        """The engine request of a video job; ApiError (4xx naming the field) if invalid."""
        self._check_model(body.model)
        p = self.preset
        if not p.is_video:
            raise ApiError(
                400,
                f"{self.model_name} is an image model: use POST /v1/images/generations",
                param="model",
                code="unsupported_model",
            )
        width, height = self._size(body.size)
        if body.seconds is not None and body.num_frames is not None:
            raise ApiError(400, "give seconds or num_frames, not both", param="seconds", code="invalid_value")
        if body.num_frames is not None:
            frames = body.num_frames
        else:
            seconds = 4.0 if body.seconds is None else self._seconds(body.seconds)
            k = max(0, round(seconds * body.fps / p.frame_step))
            frames = p.frame_step * k + 1
            if body.seconds is None:
                frames = min(frames, p.max_frames)
        steps = self._steps(body.num_inference_steps)
        guidance = p.default_guidance if body.guidance_scale is None else body.guidance_scale
        request = self._request(
            request_id=f"video_{uuid.uuid4().hex}",
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            seed=random.randrange(2**31) if body.seed is None else body.seed,
            deadline_s=self._deadline(body.slo_ms),
            priority=body.priority,
            preemptible=body.preemptible,
            slo_class=body.slo_class or "",
        )
        self.check_cost([request])
        return request

    @staticmethod
    def _seconds(value: float | str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise ApiError(400, f"seconds must be a number, got {value!r}", param="seconds") from None
        if not math.isfinite(seconds) or not 0 < seconds <= 3600:
            raise ApiError(400, f"seconds must be in (0, 3600], got {value!r}", param="seconds")
        return seconds

    # -- admission -----------------------------------------------------------------------------
    def _reject(self, reason: str, error: ApiError) -> ApiError:
        self.metrics.rejected.labels(reason=reason).inc()
        return error

    def _retry_after_s(self) -> int:
        """A guess at when the queue has room: the waiting requests' mean latency spread over the
        ranks, between 1 and 60 seconds."""
        per_request = self._latency_ema_s or 1.0
        waiting = self.engine.num_queued() + self.engine.num_running()
        return int(min(60, max(1, math.ceil(per_request * waiting / self.engine.world.size))))

    def submit(self, requests: list[Request], kind: str, events: asyncio.Queue) -> list[Tracked]:
        """Accepts all of `requests` or none (Note [Accepted requests end]). ApiError: 503 while
        shutting down or with a dead worker, 429 (Retry-After) when the queue lacks room, 400 if the
        engine refuses one."""
        ok, why = self.health()
        if not ok:
            code = "shutting_down" if self.draining else "unavailable"
            raise self._reject("unavailable", ApiError(503, f"server unavailable: {why}", code=code))
        room = self.engine.max_queue - self.engine.num_queued()
        if room < len(requests):
            retry = self._retry_after_s()
            raise self._reject(
                "queue_full",
                ApiError(
                    429,
                    f"queue full ({self.engine.max_queue} requests waiting); retry in about {retry} s",
                    code="queue_full",
                    headers={"Retry-After": str(retry)},
                ),
            )
        loop = asyncio.get_running_loop()
        accepted: list[Tracked] = []
        try:
            for i, request in enumerate(requests):
                handle = self.engine.submit(request)
                tracked = Tracked(handle, kind, i, events)
                accepted.append(tracked)
                self._active[handle.request_id] = tracked
                events.put_nowait((i, handle.progress()))
                handle.subscribe(sink=_Sink(loop, lambda p, t=tracked: self._on_progress(t, p)))
        except (OverflowError, ValueError, RuntimeError) as e:
            for t in accepted:
                t.handle.cancel()
            if isinstance(e, OverflowError):
                retry = self._retry_after_s()
                error = ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(retry)})
                raise self._reject("queue_full", error) from None
            if isinstance(e, ValueError):
                error = ApiError(400, str(e), param=field_of_message(str(e)), code="invalid_value")
                raise self._reject("invalid", error) from None
            raise self._reject(
                "unavailable", ApiError(503, f"server unavailable: {e}", code="unavailable")
            ) from None
        return accepted

    def _on_progress(self, tracked: Tracked, progress) -> None:
        """Every event of an accepted request, on the loop, in order."""
        tracked.events.put_nowait((tracked.index, progress))
        if progress.state not in kTerminal or tracked.ended:
            return
        tracked.ended = True
        handle = tracked.handle
        rid = handle.request_id
        self._active.pop(rid, None)
        result = None
        if progress.state == Status.COMPLETED:
            result = handle.result(timeout=0)
            ema = self._latency_ema_s
            self._latency_ema_s = result.latency_s if ema is None else 0.8 * ema + 0.2 * result.latency_s
        record = self.engine.scheduler.records.get(rid)
        try:
            self.metrics.record_end(tracked.kind, progress.state, record, result)
        finally:
            self.engine.forget(rid)

    # -- waiting ------------------------------------------------------------------------------
    @staticmethod
    async def next_event(events: asyncio.Queue, timeout: float):
        """The next (index, Progress), or None after `timeout` seconds."""
        try:
            return await asyncio.wait_for(events.get(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return None

    def failure(self, tracked: list[Tracked]) -> ApiError | None:
        """None if every request completed; else the error to answer with."""
        bad = [t for t in tracked if t.handle.progress().state != Status.COMPLETED]
        if not bad:
            return None
        t = bad[0]
        state, reason = t.handle.progress().state, t.handle.error or "unknown reason"
        if state == Status.CANCELLED:
            return ApiError(503, f"request {t.handle.request_id} was cancelled", code="cancelled")
        ok, _ = self.health()
        status = 503 if not ok else 500
        return ApiError(status, f"request {t.handle.request_id} failed: {reason}", code="generation_failed")

    # -- results ------------------------------------------------------------------------------
    @staticmethod
    def info(tracked: list[Tracked]) -> dict:
        """GenerationInfo fields of completed requests."""
        results = [t.handle.result(timeout=0) for t in tracked]
        return {
            "latency_ms": 1000.0 * max(r.latency_s for r in results),
            "queue_ms": 1000.0 * max(r.queue_s for r in results),
            "reshards": sum(r.num_reshards for r in results),
            "bytes_moved": sum(r.bytes_moved for r in results),
            "request_ids": [t.handle.request_id for t in tracked],
            "groups": [[{"task": task, "ranks": list(ranks)} for task, ranks in r.groups] for r in results],
        }

    # -- video jobs ----------------------------------------------------------------------------
    def add_job(self, job: VideoJobState) -> None:
        self.jobs[job.id] = job
        finished = [j for j in self.jobs.values() if j.status in (Status.COMPLETED, Status.FAILED)]
        for old in finished[: max(0, len(finished) - self.config.max_finished_jobs)]:
            del self.jobs[old.id]

    async def watch_job(self, job: VideoJobState) -> None:
        """Moves a job through its states from its request's events; encodes the mp4 at the end."""
        from .media import mp4_bytes

        handle = job.tracked.handle
        while True:
            _, p = await job.tracked.events.get()
            if p.state == Status.IN_PROGRESS:
                job.status = Status.IN_PROGRESS
                job.progress = max(job.progress, min(99, int(100 * p.step / max(1, p.num_steps))))
            if p.state in kTerminal:
                break
        if p.state == Status.COMPLETED:
            result = handle.result(timeout=0)
            try:
                job.content = await asyncio.to_thread(mp4_bytes, result.images[0], job.fps)
            except Exception as e:  # an encoder problem fails the job, with the reason
                log.exception("video %s: mp4 encoding failed", job.id)
                self._fail_job(job, "encoding_failed", f"mp4 encoding failed: {type(e).__name__}: {e}")
                return
            job.info = self.info([job.tracked])
            job.status, job.progress, job.completed_at = Status.COMPLETED, 100, int(time.time())
            if job.deleted:  # DELETE came while the mp4 was being encoded
                job.content = None
                self.jobs.pop(job.id, None)
        elif p.state == Status.CANCELLED:
            self._fail_job(job, "cancelled", "the job was cancelled (DELETE)")
        else:
            self._fail_job(job, "generation_failed", handle.error or "unknown reason")

    @staticmethod
    def _fail_job(job: VideoJobState, code: str, message: str) -> None:
        job.status, job.completed_at = Status.FAILED, int(time.time())
        job.error = {"code": code, "message": message}

    def job_view(self, job: VideoJobState) -> dict:
        r = job.request
        return {
            "id": job.id,
            "object": "video",
            "model": self.model_name,
            "status": job.status,
            "progress": job.progress,
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "size": f"{r.width}x{r.height}",
            "seconds": f"{r.num_frames / job.fps:g}",
            "requested_seconds": job.requested_seconds,
            "num_frames": r.num_frames,
            "fps": job.fps,
            "seed": r.seed,
            "error": job.error,
            "gfdit": job.info,
        }

    # -- shutdown ------------------------------------------------------------------------------
    def drain(self, timeout_s: float | None = None) -> None:
        """Stops admission, waits up to `timeout_s` (default config.drain_s) for accepted requests to
        end, then closes the engine, which fails the rest with its reason. Blocking: call it from a
        thread other than the event loop's (the loop must keep running to deliver the ends)."""
        with self._drain_lock:
            if self._drained:
                return
            self.draining = True
            timeout_s = self.config.drain_s if timeout_s is None else timeout_s
            log.info("draining: %d accepted requests, up to %.1f s", self.num_active, timeout_s)
            deadline = time.monotonic() + timeout_s
            while self._active and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._active:
                log.warning(
                    "drain: %d requests still running; closing the engine fails them", len(self._active)
                )
            self.drain_failed = len(self._active)
            self.engine.close()
            self._drained = True
            deadline = time.monotonic() + 5.0  # the loop hands the ends to their clients
            while self._active and time.monotonic() < deadline:
                time.sleep(0.05)
