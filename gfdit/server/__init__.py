"""The HTTP front end of rank 0: OpenAI-compatible images and video jobs over a gfdit Engine
(gfdit.server.app), with admission, progress as server-sent events, and Prometheus metrics.
`python -m gfdit.serve` (under torchrun) runs it."""

from .app import create_app
from .state import ServerConfig, ServerState

__all__ = ["create_app", "ServerConfig", "ServerState"]
