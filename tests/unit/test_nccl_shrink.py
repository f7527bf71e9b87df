"""The NCCL shrink path (Note [NCCL shrink] in gfcoll.nccl_shrink) against a fake libnccl on CPU:
the calls, their order and arguments, the version and symbol checks, non-blocking progress, and
errors. The real run is in the multi-GPU measurement issues."""

import ctypes

import pytest

from gfcoll.errors import GfcollNcclError, GfcollUnsupportedError, GfcollValueError
from gfcoll.nccl_shrink import (
    NcclShrinker,
    kNcclInProgress,
    kNcclRevokeDefault,
    kNcclShrinkAbort,
    plan_shrink,
)

kParent, kChild = 0x1000, 0x2000


class FakeNccl:
    """The few libnccl functions the shrink uses, recording every call. `in_progress`: how many
    polls a non-blocking call reports ncclInProgress for."""

    def __init__(self, version=22809, revoke=True, shrink=True, shrink_rc=0, in_progress=0):
        self._version, self._shrink_rc, self._pending = version, shrink_rc, in_progress
        self.calls = []
        if not revoke:
            self.ncclCommRevoke = None  # removed below: the symbol is missing
        if not shrink:
            self.ncclCommShrink = None

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if value is None and name.startswith("nccl"):
            raise AttributeError(name)  # what ctypes.CDLL raises for a missing symbol
        return value

    def ncclGetVersion(self, out):
        out._obj.value = self._version
        return 0

    def ncclCommRevoke(self, comm, flags):
        self.calls.append(("revoke", comm.value, flags))
        return kNcclInProgress if self._pending else 0

    def ncclCommShrink(self, comm, excluded, n, newcomm, config, flags):
        self.calls.append(("shrink", comm.value, list(excluded)[:n], config, flags))
        if self._shrink_rc:
            return self._shrink_rc
        newcomm._obj.value = kChild
        return kNcclInProgress if self._pending else 0

    def ncclCommGetAsyncError(self, comm, out):
        self.calls.append(("poll", comm.value))
        self._pending -= 1
        out._obj.value = kNcclInProgress if self._pending > 0 else 0
        return 0

    def ncclGetErrorString(self, rc):
        return b"unhandled system error"


def test_plan_numbers_the_survivors_in_order():
    p = plan_shrink(6, [4, 1, 4], my_rank=3)
    assert p.excluded == (1, 4) and p.survivors == (0, 2, 3, 5)
    assert p.new_rank == {0: 0, 2: 1, 3: 2, 5: 3} and p.my_new_rank == 2
    with pytest.raises(GfcollValueError, match="itself"):
        plan_shrink(4, [2], my_rank=2)
    with pytest.raises(GfcollValueError, match="not in"):
        plan_shrink(4, [7], my_rank=0)


def test_revoke_then_shrink_with_abort():
    lib = FakeNccl()
    child = NcclShrinker(lib).shrink(kParent, plan_shrink(4, [2], my_rank=0))
    assert child.value == kChild
    assert lib.calls == [
        ("revoke", kParent, kNcclRevokeDefault),
        ("shrink", kParent, [2], None, kNcclShrinkAbort),
    ]


def test_without_revoke_the_shrink_aborts_alone():
    lib = FakeNccl(revoke=False)
    s = NcclShrinker(lib)
    assert not s.has_revoke
    assert s.shrink(ctypes.c_void_p(kParent), plan_shrink(4, [1, 3], my_rank=2)).value == kChild
    assert lib.calls == [("shrink", kParent, [1, 3], None, kNcclShrinkAbort)]


def test_nonblocking_calls_are_polled_until_done():
    lib = FakeNccl(in_progress=3)
    child = NcclShrinker(lib, poll_s=0).shrink(kParent, plan_shrink(4, [3], my_rank=1))
    assert child.value == kChild
    kinds = [c[0] for c in lib.calls]
    assert kinds[0] == "revoke" and "shrink" in kinds and kinds.count("poll") >= 2
    assert all(c[1] == kParent for c in lib.calls[: kinds.index("shrink")])  # the revoke settled first


def test_a_revoke_that_never_settles_times_out():
    lib = FakeNccl(in_progress=10**9)
    with pytest.raises(GfcollNcclError, match="ncclCommRevoke: still in progress"):
        NcclShrinker(lib, poll_s=0, timeout_s=0.05).shrink(kParent, plan_shrink(2, [1], my_rank=0))


@pytest.mark.parametrize(
    "lib, words",
    [(FakeNccl(version=22603), "older than 2.27"), (FakeNccl(shrink=False), "no ncclCommShrink")],
)
def test_old_or_missing_shrink_is_refused_before_any_call(lib, words):
    s = NcclShrinker(lib)
    ok, why = s.can_shrink()
    assert not ok and words in why
    with pytest.raises(GfcollUnsupportedError, match=words):
        s.shrink(kParent, plan_shrink(4, [2], my_rank=0))
    assert [c for c in lib.calls if c[0] != "poll"] == []


def test_a_failed_shrink_names_the_error():
    with pytest.raises(GfcollNcclError, match="ncclCommShrink failed with ncclResult 2: unhandled system"):
        NcclShrinker(FakeNccl(shrink_rc=2)).shrink(kParent, plan_shrink(4, [2], my_rank=0))


class FakeNativeNccl:
    """The native transport's side of a shrink (NcclTransport.comm_handle / adopt)."""

    def __init__(self, handle=kParent):
        self.handle = handle
        self.adopted = []

    def comm_handle(self):
        return self.handle

    def library_path(self):
        raise AssertionError("the test passes its own shrinker")

    def adopt(self, comm, comm_rank_of):
        self.adopted.append((comm, list(comm_rank_of)))
        self.handle = comm


def _world(rank, size, native):
    import torch

    from gfcoll.world import World

    w = World(rank, size, rank, size, torch.device("cpu"))
    w.attach_transport("nccl", native)
    return w


def test_world_shrinks_nccl_to_the_survivors_and_maps_global_ranks():
    native, lib = FakeNativeNccl(), FakeNccl()
    w = _world(1, 4, native)
    assert w.shrink_nccl(shrinker=NcclShrinker(lib)) is False  # nothing excluded: no call
    assert lib.calls == [] and native.adopted == []
    w.exclude([2])
    assert w.shrink_nccl(shrinker=NcclShrinker(lib)) is True
    assert ("shrink", kParent, [2], None, kNcclShrinkAbort) in lib.calls
    assert native.adopted == [(kChild, [0, 1, -1, 2])]  # global 3 is communicator rank 2 now
    assert w.shrink_nccl(shrinker=NcclShrinker(lib)) is False  # rank 2 is already out
    # A second loss is named by its rank in the CURRENT communicator: global 3 is rank 2 there.
    lib.calls.clear()
    w.exclude([3])
    assert w.shrink_nccl(shrinker=NcclShrinker(lib)) is True
    assert [c for c in lib.calls if c[0] == "shrink"] == [("shrink", kChild, [2], None, kNcclShrinkAbort)]
    assert native.adopted[-1] == (kChild, [0, 1, -1, -1])


def test_world_shrink_refuses_a_gone_communicator_and_is_a_noop_without_nccl():
    import torch

    from gfcoll.world import World

    w = _world(0, 2, FakeNativeNccl(handle=0))
    w.exclude([1])
    with pytest.raises(GfcollUnsupportedError, match="communicator is gone"):
        w.shrink_nccl(shrinker=NcclShrinker(FakeNccl()))
    plain = World(0, 2, 0, 2, torch.device("cpu"))
    plain.exclude([1])
    assert plain.shrink_nccl() is False
