"""Errors of the HTTP API: one exception type, OpenAI-shaped bodies, and the request-body size limit.

Every error answers `{"error": {"message", "type", "param", "code"}}`. Validation problems are 400
(OpenAI's status for them, also for what FastAPI would answer 422) with `param` naming the field.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "install_error_handlers", "BodySizeLimit", "error_body", "field_of_message"]

log = logging.getLogger("gfdit.server")

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = error_body(self.status, self.message, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Request fields whose ValueError messages (gfdit.request.Request, check_request) name them, mapped to
# the API field that carries them.
_FIELD_TO_PARAM = {
    "width": "size",
    "height": "size",
    "num_frames": "num_frames",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "model": "model",
    "seed": "seed",
    "deadline_s": "slo_ms",
    "priority": "priority",
}


def field_of_message(message: str) -> str | None:
    """The API field a runtime ValueError names (its messages start with the field), or None."""
    head = message.split(" ", 1)[0].rstrip(":")
    return _FIELD_TO_PARAM.get(head)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('msg', '')}", None
    if param is None:
        return f"the body must be a JSON object: {e.get('msg', '')}", None
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param}: {e.get('msg', 'invalid')}{extra}", param


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Every error answers OpenAI's shape; `on_error(status)` (optional) counts each one."""
    count = on_error or (lambda _status: None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        count(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(400)
        message, param = _validation_message(exc)
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if param is None and ctype and ctype != "application/json" and not ctype.endswith("+json"):
            # FastAPI reads a JSON body only when the request says it is JSON (curl -d says otherwise).
            message = (
                f"the body must be a JSON object sent with 'Content-Type: application/json'; this request's "
                f"Content-Type is {ctype!r} (curl -d sends that unless given -H 'content-type: application/json')"
            )
        return JSONResponse(error_body(400, message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        count(500)
        log.exception("unhandled error: %s", exc)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)


class BodySizeLimit:
    """ASGI middleware: request bodies larger than `max_bytes` get 413 before the app reads them.

    A declared Content-Length is checked at once; a chunked body is read (up to the limit) and
    replayed to the app, which then still sees the client's later messages (a disconnect)."""

    def __init__(self, app, max_bytes: int, on_error=None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error or (lambda _status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._reply(send, 400, "Content-Length is not an integer")
            if size > self.max_bytes:
                return await self._reply(send, 413, self._too_large(f"{size} bytes"))
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._reply(send, 413, self._too_large(f"more than {self.max_bytes} bytes"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self, what: str) -> str:
        return f"request body too large: {what}, at most {self.max_bytes} bytes"

    async def _reply(self, send, status: int, message: str) -> None:
        self.on_error(status)
        body = json.dumps(
            error_body(status, message, code="body_too_large" if status == 413 else None)
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
