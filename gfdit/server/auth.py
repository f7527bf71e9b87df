"""API keys of the HTTP API: `Authorization: Bearer <key>`, as OpenAI's SDKs send it.

With a key configured (gfdit.serve --api-key, or GFDIT_API_KEY), every /v1/* route (and /metrics
with --protect-metrics) answers 401 with OpenAI's error body unless the request carries the key;
the comparison takes the same time whatever the bytes given. /health stays open (orchestrators
probe it without credentials), and so do the API's schema and docs. The key is never logged.
"""

from __future__ import annotations

import hmac
import json

from .errors import error_body

__all__ = ["ApiKeyAuth", "kProtectedPrefix"]

kProtectedPrefix = "/v1"


def _unauthorized(message: str) -> tuple[dict, bytes]:
    body = error_body(401, message, code="invalid_api_key")
    body["error"]["type"] = "invalid_request_error"
    headers = [
        (b"content-type", b"application/json"),
        (b"www-authenticate", b'Bearer realm="gfdit"'),
    ]
    return headers, json.dumps(body).encode()


class ApiKeyAuth:
    """ASGI middleware: requires the key on protected paths before the app (or a body) is read.
    `on_error(status)` counts each refusal (the server's error metric)."""

    def __init__(self, app, *, api_key: str, protect_metrics: bool = False, on_error=None):
        if not api_key:
            raise ValueError("ApiKeyAuth needs a non-empty key")
        self.app = app
        self._key = api_key.encode()
        self._protect_metrics = protect_metrics
        self._on_error = on_error or (lambda _status: None)

    def __repr__(self) -> str:  # never print the key
        return f"ApiKeyAuth(protect_metrics={self._protect_metrics})"

    def _protected(self, path: str) -> bool:
        if path == kProtectedPrefix or path.startswith(kProtectedPrefix + "/"):
            return True
        return self._protect_metrics and (path == "/metrics" or path.startswith("/metrics/"))

    def _check(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """None when the request carries the key, else why not (no part of the key in it)."""
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if not values:
            return (
                "You didn't provide an API key. Provide it in an Authorization header: "
                "'Authorization: Bearer YOUR_KEY'."
            )
        scheme, _, token = values[0].strip().partition(b" ")
        ok = len(values) == 1 and scheme.lower() == b"bearer"
        # compare_digest even when the scheme is wrong: the time taken never depends on the key.
        ok = hmac.compare_digest(token.strip(), self._key) and ok
        return None if ok else "Incorrect API key provided."

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._protected(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        problem = self._check(scope.get("headers") or [])
        if problem is None:
            await self.app(scope, receive, send)
            return
        self._on_error(401)
        headers, body = _unauthorized(problem)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
