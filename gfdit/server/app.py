"""The HTTP API of rank 0 (FastAPI): OpenAI-style images and video jobs, models, health, metrics.

    app = create_app(engine, ServerConfig(policy="fcfs-elastic"))   # engine: a gfdit Engine, rank 0
    uvicorn.run(app, host="0.0.0.0", port=8000)

Endpoints (bodies in gfdit.server.schemas; errors are OpenAI-shaped, see gfdit.server.errors):
  POST   /v1/images/generations      n images (n engine requests); `stream: true` for server-sent events
  POST   /v1/videos                  an asynchronous video job (JSON, or form fields as OpenAI's SDKs send)
  GET    /v1/videos                  the jobs kept, newest first
  GET    /v1/videos/{id}             status queued | in_progress | completed | failed, progress 0-100
  GET    /v1/videos/{id}/content     the mp4: 404 until completed, 409 if failed
  DELETE /v1/videos/{id}             cancels (ranks freed at the next rescheduling point), drops content
  GET    /v1/models, /v1/models/{id} the served model
  GET    /health                     200 while work is admitted ("ok" or "degraded"), else 503
  GET    /metrics                    Prometheus text format
The app does not own the engine: whoever made the engine closes it (gfdit.serve drains first).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import time
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from gfdit.runtime.handle import Status

from .auth import ApiKeyAuth
from .errors import ApiError, BodySizeLimit, error_body, install_error_handlers
from .media import image_b64
from .schemas import (
    ErrorResponse,
    Health,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoCreateRequest,
    VideoDeleted,
    VideoJob,
    VideoList,
)
from .state import ServerConfig, ServerState, Tracked, VideoJobState, kTerminal

__all__ = ["create_app"]

log = logging.getLogger("gfdit.server")

kKeepAliveS = 15.0  # an SSE comment after this long without events keeps proxies from timing out
kDisconnectPollS = 0.5  # how often a waiting non-streamed request checks that its client is still there

_ERRORS = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "invalid request (the message and `param` name the field)"),
        (401, "missing or wrong API key (with --api-key)"),
        (404, "unknown model or job"),
        (413, "request body too large"),
        (429, "queue full (Retry-After)"),
        (503, "shutting down, or a worker is down"),
    )
}


# POST /v1/videos takes JSON or form fields (OpenAI's SDKs send multipart/form-data there): one schema,
# validated strictly from JSON and with string-to-number conversion from a form.
kFormTypes = ("multipart/form-data", "application/x-www-form-urlencoded")
kMaxFormFields = 64


def _video_body_docs() -> dict:
    schema = VideoCreateRequest.model_json_schema()
    form = {
        **schema,
        "properties": {**schema["properties"], "input_reference": {"type": "string", "format": "binary"}},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, **{t: {"schema": form} for t in kFormTypes}},
        }
    }


async def _video_body(request: Request, model_name: str) -> VideoCreateRequest:
    """The body of POST /v1/videos from JSON or form fields; 4xx naming the field otherwise."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    try:
        if ctype in kFormTypes:
            if importlib.util.find_spec("python_multipart") is None:
                raise ApiError(415, f"{ctype} needs the python-multipart package on the server: send JSON")
            try:
                form = await request.form(max_files=4, max_fields=kMaxFormFields)
            except Exception as e:  # malformed multipart / urlencoded data, too many parts
                raise ApiError(400, f"the body is not valid {ctype}: {e}") from None
            fields: dict[str, str] = {}
            try:
                for key, value in form.multi_items():
                    if key == "input_reference":
                        raise ApiError(
                            400,
                            f"input_reference: {model_name} generates video from text only (no image-to-video)",
                            param="input_reference",
                            code="unsupported_value",
                        )
                    if not isinstance(value, str):
                        raise ApiError(400, f"{key}: a file where a value was expected", param=key)
                    if key in fields:
                        raise ApiError(400, f"{key}: given more than once", param=key)
                    fields[key] = value
            finally:
                await form.close()
            return VideoCreateRequest.model_validate(fields, strict=False)
        if ctype in ("application/json", "") or ctype.endswith("+json"):
            return VideoCreateRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    raise ApiError(
        415,
        f"Content-Type {ctype!r}: send application/json or multipart/form-data",
        code="unsupported_media_type",
    )


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over `engine` (an Engine on rank 0). Its ServerState is `app.state.gfdit`."""
    state = ServerState(engine, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        state.draining = True  # the server is stopping: refuse what still arrives

    app = FastAPI(
        title="gf-dit",
        version="0.1.0",
        summary="Elastic serving of diffusion transformers (OpenAI-compatible images and videos)",
        lifespan=lifespan,
    )
    app.state.gfdit = state
    count = state.metrics.count_error
    install_error_handlers(app, on_error=count)
    app.add_middleware(BodySizeLimit, max_bytes=state.config.max_body_bytes, on_error=count)
    if state.config.api_key:  # added last: the outermost, so no body is read before the key is checked
        app.add_middleware(
            ApiKeyAuth,
            api_key=state.config.api_key,
            protect_metrics=state.config.protect_metrics,
            on_error=count,
        )

    # -- images --------------------------------------------------------------------------------
    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}, 500: {"model": ErrorResponse}},
    )
    async def generate_images(body: ImageGenerationRequest, request: Request):
        """Generates n images (PNG, base64). With `stream: true`: server-sent events, each
        `data: {json}`: progress events (`image_generation.progress`: index, step, num_steps,
        degree, state) in order, then `image_generation.completed` (the response body) or `error`,
        then `data: [DONE]`. A client that disconnects cancels its requests."""
        events: asyncio.Queue = asyncio.Queue()
        tracked = state.submit(state.image_requests(body), "image", events)
        if body.stream:
            return StreamingResponse(
                _image_events(state, tracked, events, body),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            next_check = time.monotonic() + kDisconnectPollS
            while not all(t.ended for t in tracked):
                await state.next_event(events, kDisconnectPollS)
                if time.monotonic() >= next_check:  # events may come faster than the poll period
                    next_check = time.monotonic() + kDisconnectPollS
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected", code="client_disconnected")
        finally:
            _cancel_unfinished(tracked)
        error = state.failure(tracked)
        if error is not None:
            raise error
        return JSONResponse(await _images_body(state, tracked, body))

    # -- videos --------------------------------------------------------------------------------
    @app.post(
        "/v1/videos",
        response_model=VideoJob,
        responses={**_ERRORS, 415: {"model": ErrorResponse, "description": "not JSON nor form data"}},
        openapi_extra=_video_body_docs(),
    )
    async def create_video(http_request: Request):
        """Queues a video job; poll GET /v1/videos/{id}, then fetch /content. The body is JSON, or
        form fields (multipart/form-data or urlencoded, as OpenAI's SDKs send): the same fields."""
        body = await _video_body(http_request, state.model_name)
        request = state.video_request(body)
        events: asyncio.Queue = asyncio.Queue()
        (tracked,) = state.submit([request], "video", events)
        job = VideoJobState(request.request_id, tracked, request, body.fps, int(time.time()))
        job.requested_seconds = None if body.seconds is None else str(body.seconds)
        state.add_job(job)
        job.watcher = asyncio.create_task(state.watch_job(job), name=f"watch-{job.id}")
        return JSONResponse(state.job_view(job))

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(limit: int = Query(20, ge=1, le=1000)):
        """The jobs kept (running ones, and the latest finished ones), newest first."""
        jobs = list(state.jobs.values())[::-1][:limit]
        return JSONResponse({"object": "list", "data": [state.job_view(j) for j in jobs]})

    def _job(video_id: str) -> VideoJobState:
        job = state.jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video job {video_id!r}", param="video_id", code="video_not_found")
        return job

    @app.get("/v1/videos/{video_id}", response_model=VideoJob, responses={404: _ERRORS[404]})
    async def get_video(video_id: str):
        return JSONResponse(state.job_view(_job(video_id)))

    @app.get(
        "/v1/videos/{video_id}/content",
        response_class=Response,
        responses={
            200: {"content": {"video/mp4": {}}, "description": "the mp4"},
            404: _ERRORS[404],
            409: {"model": ErrorResponse, "description": "the job failed"},
        },
    )
    async def get_video_content(video_id: str, variant: Literal["video"] = "video"):
        """The mp4 of a completed job: 404 until then, 409 if it failed."""
        job = _job(video_id)
        if job.status == Status.FAILED:
            message = f"video {video_id} failed: {job.error['message']}"
            raise ApiError(409, message, param="video_id", code=job.error["code"])
        if job.status != Status.COMPLETED:
            raise ApiError(404, f"video {video_id} is {job.status}: no content yet", code="video_not_ready")
        return Response(job.content, media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={404: _ERRORS[404]})
    async def delete_video(video_id: str):
        """Cancels a job that still runs (it ends `failed` with error code `cancelled`, its ranks
        freed at the next rescheduling point, and stays listed so that clients see it end) or
        forgets a finished one (GET then answers 404)."""
        job = _job(video_id)
        job.deleted, job.content = True, None
        if job.status in (Status.COMPLETED, Status.FAILED):
            del state.jobs[video_id]
        else:
            job.tracked.handle.cancel()  # a no-op if it finished in the engine and only encoding is left
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    # -- models, health, metrics ------------------------------------------------------------------
    def _card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.started_at, "owned_by": "gfdit"}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return JSONResponse({"object": "list", "data": [_card()]})

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: _ERRORS[404]})
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise ApiError(
                404, f"model {model_id!r} is not served here", param="model_id", code="model_not_found"
            )
        return JSONResponse(_card())

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        """200 while the server admits work ("ok": every rank up; "degraded": some lost or hung, still
        serving on the others); 503 ("draining", "unavailable") with the reason otherwise."""
        status, reason, ranks = state.health_report()
        ok = status in ("ok", "degraded")
        body = {
            "status": status,
            "reason": reason,
            "ranks": [
                {"rank": i.rank, "pid": i.pid, "state": i.state, "requests": i.requests} for i in ranks
            ],
            "model": state.model_name,
            "policy": state.config.policy or engine.policy.spec(),
            "policy_spec": engine.policy.spec(),
            "world_size": engine.world.size,
            "queued": engine.num_queued(),
            "running": engine.num_running(),
            "waiting": engine.num_waiting(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _cancel_unfinished(tracked: list[Tracked]) -> None:
    for t in tracked:
        if not t.handle.done():
            t.handle.cancel()


async def _images_body(state: ServerState, tracked: list[Tracked], body: ImageGenerationRequest) -> dict:
    results = [t.handle.result(timeout=0) for t in tracked]
    fmt = body.output_format or "png"
    images = await asyncio.to_thread(
        lambda: [image_b64(r.images[0], fmt, body.output_compression) for r in results]
    )
    data = [
        {"b64_json": b64, "seed": t.handle.request.seed, "revised_prompt": None}
        for b64, t in zip(images, tracked, strict=True)
    ]
    first = tracked[0].handle.request
    return {
        "created": int(time.time()), "data": data, "output_format": fmt,
        "size": f"{first.width}x{first.height}", "quality": body.quality or "auto", "background": "opaque",
        "gfdit": state.info(tracked),
    }  # fmt: skip


async def _image_events(
    state: ServerState, tracked: list[Tracked], events: asyncio.Queue, body: ImageGenerationRequest
):
    """The SSE body of a streamed image call. Closing it early (the client left) cancels the requests."""
    pending = {t.index for t in tracked}
    last: dict[int, tuple] = {}
    try:
        while pending:
            item = await state.next_event(events, kKeepAliveS)
            if item is None:
                yield ": keep-alive\n\n"
                continue
            i, p = item
            key = (p.state, p.step, p.degree, p.task)
            if i not in pending or last.get(i) == key:
                continue
            last[i] = key
            yield _sse(
                {
                    "type": "image_generation.progress",
                    "index": i,
                    "step": p.step,
                    "num_steps": p.num_steps,
                    "degree": p.degree,
                    "state": p.state,
                    "task": p.task,
                }
            )
            if p.state in kTerminal:
                pending.discard(i)
        error = state.failure(tracked)
        if error is not None:
            yield _sse({"type": "error", **error_body(error.status, error.message, code=error.code)})
        else:
            yield _sse({"type": "image_generation.completed", **(await _images_body(state, tracked, body))})
        yield "data: [DONE]\n\n"
    finally:
        _cancel_unfinished(tracked)
