"""Request and response bodies of the HTTP API (pydantic), OpenAI-compatible where OpenAI defines them.

Request models forbid unknown fields and use strict JSON types (a string is not a number), so a
typo or a wrong type is a 400 naming the field rather than a silently ignored option. Limits that
depend on the served model (sizes, frames, prompt tokens) are checked later, against the model
(gfdit.models.presets.check_request); the ones here only bound the work a request may ask for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "kMaxPromptChars",
    "kMaxSeed",
    "kQualitySteps",
    "ErrorBody",
    "ErrorResponse",
    "ImageGenerationRequest",
    "ImageData",
    "GenerationInfo",
    "TaskGroup",
    "ImagesResponse",
    "VideoCreateRequest",
    "VideoError",
    "VideoJob",
    "VideoList",
    "VideoDeleted",
    "ModelCard",
    "ModelList",
    "Health",
]

kMaxPromptChars = 4000  # characters; the model's tokenizer then bounds the tokens (presets' max_length)
kMaxSeed = 2**32 - 1  # seeds are uint32 like most pipelines'; n images use seed, seed + 1, ...
kSizePattern = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
kClassPattern = r"^[A-Za-z0-9_.-]{1,32}$"  # a workload class label (slo_class)

_REQUEST = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str  # what is wrong, naming the field when a field is
    type: str  # "invalid_request_error", "not_found_error", "rate_limit_error", "server_error", ...
    param: str | None = None  # the offending request field, if one is
    code: str | None = None  # machine-readable reason: "invalid_value", "queue_full", "shutting_down", ...


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body."""

    error: ErrorBody


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations: every parameter of OpenAI's images.generate, then gf-dit's.
    What each OpenAI parameter does here (honoured, accepted and ignored, or refused with a reason):
    kImageParameters, the table in the README."""

    model_config = _REQUEST

    prompt: str = Field(min_length=1, max_length=kMaxPromptChars)  # text prompt
    model: str | None = None  # must name the served model when given
    n: int = Field(1, ge=1, le=10)  # images: n requests with seeds seed, seed + 1, ...
    size: str | None = Field(None, pattern=kSizePattern)  # "WIDTHxHEIGHT" or "auto" (None: model default)
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = None  # steps
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None  # None: png; gif/svg are a 400
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg/webp quality, 100 best; png: none
    background: Literal["auto", "opaque", "transparent"] | None = None  # images are opaque; transparent: 400
    style: Literal["vivid", "natural"] | None = None  # accepted, ignored (a legacy DALL-E parameter)
    moderation: Literal["low", "auto"] | None = None  # accepted, ignored: gf-dit does no moderation
    complexity: Literal["low", "medium", "high"] | None = None  # accepted, ignored (GPT image planning)
    partial_images: int | None = Field(None, ge=0, le=3)  # 0 or None; > 0 is a 400 (progress events instead)
    frame_count: int | None = None  # GIF output only: a 400 when given
    frame_duration_ms: int | None = None  # GIF output only: a 400 when given
    svg: dict | None = None  # SVG output only: a 400 when given
    response_format: Literal["b64_json", "url"] | None = None  # only b64_json is served; "url" is a 400
    safety_identifier: str | None = Field(None, max_length=256)  # OpenAI's end-user id: accepted, ignored
    user: str | None = Field(None, max_length=256)  # OpenAI's older end-user id: accepted, ignored
    stream: bool = False  # server-sent events: progress, then the result, then [DONE]
    num_inference_steps: int | None = Field(None, ge=1, le=10_000)  # None: from quality; see --max-steps
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)  # None: model default
    seed: int | None = Field(None, ge=0, le=kMaxSeed)  # initial-noise seed; None: the server picks one
    negative_prompt: str | None = Field(None, max_length=kMaxPromptChars)  # for models with CFG (Wan)
    priority: int = Field(0, ge=-1000, le=1000)  # larger is more important (policies may use it)
    preemptible: bool = False  # policies may pause or demote it at a chunk boundary for other work
    slo_class: str | None = Field(None, max_length=32, pattern=kClassPattern)  # workload class label
    slo_ms: float | None = Field(None, gt=0.0, le=8.64e7, allow_inf_nan=False)  # deadline: accept + slo


# quality -> fraction of the model's default num_inference_steps (at least 1 step), when the request
# gives no num_inference_steps. "auto", "standard" and the rest: the model's default.
kQualitySteps = {"low": 0.25, "medium": 0.5}


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str  # the image in the response's output_format (PNG unless asked otherwise), base64
    seed: int  # the seed that produced it
    revised_prompt: str | None = None  # OpenAI's field; gf-dit does not rewrite prompts


class TaskGroup(BaseModel):
    """One trajectory task of a request and the ordered ranks it ran on."""

    task: str  # e.g. "img-...-0:denoise[0,2)"
    ranks: list[int]  # its group, in order


class GenerationInfo(BaseModel):
    """How the requests behind one response ran (gf-dit's addition to OpenAI's body)."""

    latency_ms: float  # acceptance to result, the slowest of the requests
    queue_ms: float  # acceptance to first task, the slowest of the requests
    reshards: int  # tasks that first moved state between ranks, over all requests
    bytes_moved: int  # bytes those reshards moved, over all requests
    request_ids: list[str]  # engine request ids, one per image or video
    groups: list[list[TaskGroup]]  # per request, every task and its ranks


class ImagesResponse(BaseModel):
    """Response of POST /v1/images/generations (and the final event of a stream)."""

    created: int  # Unix seconds
    data: list[ImageData]  # n images, in seed order
    output_format: Literal["png", "jpeg", "webp"] = "png"  # OpenAI's field: the images' format
    size: str | None = None  # OpenAI's field: "WIDTHxHEIGHT" of the images
    quality: str | None = None  # OpenAI's field: the quality asked for ("auto" when none was)
    background: Literal["opaque"] = "opaque"  # OpenAI's field: gf-dit's images have no alpha channel
    gfdit: GenerationInfo  # latency, reshards, groups


class VideoCreateRequest(BaseModel):
    """POST /v1/videos: an asynchronous video job."""

    model_config = _REQUEST

    prompt: str = Field(min_length=1, max_length=kMaxPromptChars)  # text prompt
    model: str | None = None  # must name the served model when given
    size: str | None = Field(None, pattern=kSizePattern)  # "WIDTHxHEIGHT" or "auto"
    seconds: float | str | None = None  # duration (OpenAI sends "4"): frames = step*round(s*fps/step) + 1
    num_frames: int | None = Field(None, ge=1, le=10_000)  # exact frame count instead of seconds
    fps: int = Field(16, ge=1, le=120)  # frames per second of the mp4 (Wan: 16)
    num_inference_steps: int | None = Field(None, ge=1, le=10_000)  # None: the model default; see --max-steps
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)  # None: model default
    seed: int | None = Field(None, ge=0, le=kMaxSeed)  # None: the server picks one
    negative_prompt: str | None = Field(None, max_length=kMaxPromptChars)  # classifier-free guidance
    priority: int = Field(0, ge=-1000, le=1000)  # larger is more important
    preemptible: bool = False  # policies may pause or demote it at a chunk boundary for other work
    slo_class: str | None = Field(None, max_length=32, pattern=kClassPattern)  # workload class label
    slo_ms: float | None = Field(None, gt=0.0, le=8.64e7, allow_inf_nan=False)  # deadline: accept + slo
    user: str | None = Field(None, max_length=256)  # accepted, ignored


class VideoError(BaseModel):
    code: str  # "cancelled", "generation_failed", "unavailable"
    message: str  # the reason


class VideoJob(BaseModel):
    """A video job (OpenAI's video object, plus gf-dit's fields)."""

    id: str  # "video_..."
    object: Literal["video"] = "video"
    model: str  # the served model
    status: Literal["queued", "in_progress", "completed", "failed"]  # "failed" includes cancelled
    progress: int  # 0-100: denoising steps done (100 once the mp4 is ready)
    created_at: int  # Unix seconds
    completed_at: int | None = None  # Unix seconds, once completed or failed
    size: str  # "WIDTHxHEIGHT"
    seconds: str  # duration of the mp4, num_frames / fps (see requested_seconds)
    requested_seconds: str | None = None  # the seconds asked for; the frames are frame_step * k + 1, the
    # multiple nearest to seconds * fps, so `seconds` may differ (tiny-wan, 16 fps: "1" -> 17 frames, 1.0625 s)
    num_frames: int  # frames
    fps: int  # frames per second
    seed: int  # the seed used
    error: VideoError | None = None  # why it failed
    gfdit: GenerationInfo | None = None  # how it ran, once completed


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]  # newest first


class VideoDeleted(BaseModel):
    id: str  # the job
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool  # True: cancelled (if it still ran) and its content dropped


class ModelCard(BaseModel):
    id: str  # the preset name
    object: Literal["model"] = "model"
    created: int  # server start, Unix seconds
    owned_by: str = "gfdit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RankHealth(BaseModel):
    """One rank in GET /health."""

    rank: int  # global rank
    pid: int  # its process id (0 until it reported ready)
    state: Literal["starting", "up", "lost", "hung"]  # lost: its process died; hung: past the watchdog
    requests: int  # unfinished requests whose latent (or a slice of it) lives on this rank


class Health(BaseModel):
    """GET /health (200 and 503)."""

    status: Literal["ok", "degraded", "draining", "unavailable"]  # ok: every rank up; degraded: some
    # lost or hung, still serving (both HTTP 200); draining, unavailable: HTTP 503
    reason: str  # "ok" or why not
    ranks: list[RankHealth]  # every rank, 0 included
    model: str  # the served model
    policy: str  # the scheduling policy as the operator named it (--policy)
    policy_spec: str  # its full spec, every parameter included (gfdit.policy.make_policy builds it back)
    world_size: int  # ranks
    queued: int  # requests waiting for their first task
    running: int  # requests with a task in flight
    waiting: int  # started requests between two tasks (their state stays on their last group)
