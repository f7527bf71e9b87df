"""The elastic runtime: workers that run trajectory tasks on groups of ranks, and the Engine on
rank 0 that schedules them (see gfdit.runtime.engine)."""

from .engine import Engine, EngineHealth, RankInfo
from .handle import Progress, RequestHandle, Result, Status

__all__ = ["Engine", "EngineHealth", "Progress", "RankInfo", "RequestHandle", "Result", "Status"]
