"""Shrinking the nccl transport's global communicator to the survivors of lost ranks.

Note [NCCL shrink]
~~~~~~~~~~~~~~~~~~
gfcoll's nccl transport has ONE global communicator (DESIGN.md section 1). When the serving
runtime loses a rank (Note [Excluded ranks] in gfcoll.world), the survivors replace it by a
communicator of the survivors only, behind the same World:
  1. `ncclCommRevoke(comm, NCCL_REVOKE_DEFAULT)` where the loaded NCCL has the symbol (looked up at
     run time): in-flight operations stop and the communicator becomes quiescent; a non-blocking
     communicator reports ncclInProgress until then, which is polled with ncclCommGetAsyncError,
     bounded by a timeout;
  2. `ncclCommShrink(comm, excluded, n, &newcomm, NULL, NCCL_SHRINK_ABORT)` (NCCL >= 2.27): every
     survivor calls it with the same sorted list of excluded ranks; ABORT first terminates what the
     parent still runs (a dead peer's operations never complete). The new communicator numbers the
     survivors 0..k-1 in their old order (`ShrinkPlan.new_rank`), so the world keeps its global
     rank numbers and maps them to communicator ranks for every masked collective;
  3. the parent is destroyed by the transport once it has switched to the new one.
This module holds that logic over ctypes so that it is unit-tested on CPU against a fake library
(tests/unit/test_nccl_shrink.py). `World.shrink_nccl()` runs it: it plans the shrink against the
communicator's current members (a second loss is named by its rank in the already shrunk
communicator), shrinks the native transport's communicator (`NcclTransport.comm_handle()`) and hands
the child back with the global -> communicator rank map (`NcclTransport.adopt`), through which every
later operation maps its peers. The serving runtime calls it on every survivor when it handles
msg.Exclude. A communicator the nccl watchdog already aborted cannot be shrunk (GfcollUnsupportedError;
re-creating one over the survivors is not done). Never run on GPUs yet: the multi-GPU measurement
issues run it for real.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

from .errors import GfcollNcclError, GfcollUnsupportedError, GfcollValueError

__all__ = [
    "NcclShrinker",
    "ShrinkPlan",
    "kMinShrinkVersion",
    "kNcclRevokeDefault",
    "kNcclShrinkAbort",
    "kNcclShrinkDefault",
    "plan_shrink",
]

log = logging.getLogger("gfcoll.nccl_shrink")

kMinShrinkVersion = 22700  # NCCL_VERSION(2, 27, 0): the first with ncclCommShrink
kNcclShrinkDefault = 0x00  # NCCL_SHRINK_DEFAULT: shrink a healthy parent
kNcclShrinkAbort = 0x01  # NCCL_SHRINK_ABORT: terminate the parent's ongoing operations first
kNcclRevokeDefault = 0x00  # NCCL_REVOKE_DEFAULT (the only revoke flag)
kNcclSuccess = 0
kNcclInProgress = 7  # ncclInProgress: a non-blocking communicator's call has not finished yet


@dataclass(frozen=True)
class ShrinkPlan:
    """What one rank passes to ncclCommShrink and how global ranks map onto the new communicator."""

    excluded: tuple[int, ...]  # communicator ranks to remove, ascending (the same on every survivor)
    survivors: tuple[int, ...]  # the ranks that stay, ascending
    new_rank: dict[int, int]  # old (global) rank -> rank in the new communicator
    my_new_rank: int  # this rank's rank in the new communicator


def plan_shrink(world_size: int, lost, my_rank: int) -> ShrinkPlan:
    """The plan for `my_rank` when `lost` ranks leave a communicator of `world_size`. GfcollValueError
    for a rank out of range, for `my_rank` itself lost, or when nobody would remain."""
    lost = sorted(set(lost))
    for r in [*lost, my_rank]:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world_size:
            raise GfcollValueError(f"plan_shrink: rank {r!r} is not in [0, {world_size})")
    if my_rank in lost:
        raise GfcollValueError(f"plan_shrink: rank {my_rank} is itself among the lost ranks {lost}")
    survivors = tuple(r for r in range(world_size) if r not in lost)
    new_rank = {r: i for i, r in enumerate(survivors)}
    return ShrinkPlan(tuple(lost), survivors, new_rank, new_rank[my_rank])


class NcclShrinker:
    """Revoke + shrink over a loaded NCCL library (a ctypes.CDLL, or any object with the same
    functions: tests pass a fake). Note [NCCL shrink]."""

    def __init__(self, lib, *, poll_s: float = 0.001, timeout_s: float = 60.0):
        self._lib = lib
        self.poll_s = poll_s
        self.timeout_s = timeout_s

    @classmethod
    def load(cls, path: str, **kwargs) -> NcclShrinker:
        """Over the libnccl at `path` (the transport's NcclTransport.library_path(): the copy torch
        loaded, so that the communicator handles are that library's)."""
        lib = ctypes.CDLL(path)
        if _has(lib, "ncclGetErrorString"):
            lib.ncclGetErrorString.restype = ctypes.c_char_p
        return cls(lib, **kwargs)

    def version(self) -> int:
        v = ctypes.c_int(0)
        self._check(self._lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    @property
    def has_revoke(self) -> bool:
        """Whether the loaded NCCL has ncclCommRevoke (a run-time lookup)."""
        return _has(self._lib, "ncclCommRevoke")

    def can_shrink(self) -> tuple[bool, str]:
        """(True, "") when the loaded NCCL can shrink, else (False, why): the caller falls back (e.g.
        to failing the job) and logs the reason."""
        if not _has(self._lib, "ncclCommShrink"):
            return False, "the loaded NCCL has no ncclCommShrink (NCCL >= 2.27 needed)"
        v = self.version()
        if v < kMinShrinkVersion:
            return False, f"NCCL {_version_str(v)} is older than 2.27 (ncclCommShrink)"
        return True, ""

    def shrink(self, comm: int | ctypes.c_void_p, plan: ShrinkPlan) -> ctypes.c_void_p:
        """The survivors' communicator: revoke `comm` (where possible), then shrink it with
        NCCL_SHRINK_ABORT. Every survivor calls it with an equal plan. GfcollUnsupportedError when
        the library cannot shrink, GfcollNcclError when a call fails or does not finish in time."""
        ok, why = self.can_shrink()
        if not ok:
            raise GfcollUnsupportedError(f"shrink: {why}")
        parent = comm if isinstance(comm, ctypes.c_void_p) else ctypes.c_void_p(comm)
        if self.has_revoke:
            rc = self._lib.ncclCommRevoke(parent, kNcclRevokeDefault)
            self._settle(parent, rc, "ncclCommRevoke")
        else:
            log.warning(
                "shrink: the loaded NCCL has no ncclCommRevoke; NCCL_SHRINK_ABORT alone stops the parent"
            )
        excluded = (ctypes.c_int * len(plan.excluded))(*plan.excluded)
        child = ctypes.c_void_p(None)
        rc = self._lib.ncclCommShrink(
            parent, excluded, len(plan.excluded), ctypes.byref(child), None, kNcclShrinkAbort
        )
        if rc == kNcclInProgress and child.value is not None:
            self._settle(child, rc, "ncclCommShrink")
        else:
            self._check(rc, "ncclCommShrink")
        if child.value is None:
            raise GfcollNcclError("ncclCommShrink returned no communicator")
        log.warning(
            "nccl: shrank the communicator to %d ranks (excluded %s; this rank is now %d)",
            len(plan.survivors), list(plan.excluded), plan.my_new_rank,
        )  # fmt: skip
        return child

    # -- internals ---------------------------------------------------------------------------------
    def _settle(self, comm: ctypes.c_void_p, rc: int, what: str) -> None:
        """Waits (bounded) while a non-blocking call on `comm` is in progress."""
        deadline = time.monotonic() + self.timeout_s
        while rc == kNcclInProgress:
            if time.monotonic() > deadline:
                raise GfcollNcclError(f"{what}: still in progress after {self.timeout_s} s")
            time.sleep(self.poll_s)
            state = ctypes.c_int(kNcclInProgress)
            self._check(self._lib.ncclCommGetAsyncError(comm, ctypes.byref(state)), "ncclCommGetAsyncError")
            rc = state.value
        self._check(rc, what)

    def _check(self, rc: int, what: str) -> None:
        if rc != kNcclSuccess:
            text = ""
            if _has(self._lib, "ncclGetErrorString"):
                raw = self._lib.ncclGetErrorString(rc)
                text = f": {raw.decode(errors='replace') if isinstance(raw, bytes) else raw}"
            raise GfcollNcclError(f"{what} failed with ncclResult {rc}{text}")


def _has(lib, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:  # ctypes raises it for a symbol the library lacks
        return False
    return True


def _version_str(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
