"""The elastic runtime: workers that run trajectory tasks on groups of ranks, and the Engine on
rank 0 that schedules them (see gfdit.runtime.engine)."""

from .engine import Engine, RequestHandle, Result

__all__ = ["Engine", "RequestHandle", "Result"]
