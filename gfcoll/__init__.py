"""gfcoll: group-free collectives. Any ordered subset of ranks is a group, formed without
communication; setup is paid once, at ``init``. See gfcoll.world for the ordering rules."""

from ._bootstrap import build_info, init
from .errors import (
    GfcollClosedError,
    GfcollCudaError,
    GfcollError,
    GfcollMismatchError,
    GfcollNcclError,
    GfcollPeerDiedError,
    GfcollSystemError,
    GfcollTimeoutError,
    GfcollUnsupportedError,
    GfcollValueError,
)
from .world import P2P, GraphSlot, Group, Work, World

__version__ = "0.1.0"

__all__ = [
    "init",
    "build_info",
    "World",
    "Group",
    "GraphSlot",
    "P2P",
    "Work",
    "GfcollError",
    "GfcollValueError",
    "GfcollUnsupportedError",
    "GfcollMismatchError",
    "GfcollTimeoutError",
    "GfcollPeerDiedError",
    "GfcollClosedError",
    "GfcollSystemError",
    "GfcollCudaError",
    "GfcollNcclError",
]
