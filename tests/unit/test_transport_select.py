"""World._select, the one function that picks the transport of a CUDA operation, and the graph
slot's argument checks, on a World whose native transports are stand-ins (no GPU needed: the
selection is pure Python; the transports themselves are tested in tests/gpu)."""

import pytest
import torch

import gfcoll
from gfcoll._tensor import as_buf
from gfcoll.world import World


class FakeIpc:
    def __init__(self):
        self.calls = []

    def graph_slot(self, size):
        self.calls.append(("graph_slot", size))
        return len(self.calls) - 1

    def check(self):
        pass


def make_world(ipc=True, nccl=True, local=(0, 1, 2), force="auto", ring=1 << 20):
    w = World(0, 4, 0, 3, torch.device("cpu"))  # CPU tensors stand in for CUDA ones here
    w._ipc = FakeIpc() if ipc else None
    w._ipc_ranks = frozenset(local) if ipc else frozenset()
    w._ipc_ring = ring
    w._nccl = object() if nccl else None
    w._force = force
    return w


def bufs(n=1):
    return [as_buf(torch.zeros(n), "t")]


def test_nccl_where_it_exists_ipc_where_it_does_not():
    # auto: nccl whenever NCCL exists (ipc is verified on one shared GPU only); ipc without NCCL.
    w = make_world()
    assert w._select("all_reduce", w.group([2, 0]), bufs(), 0) == "nccl"
    assert w._select("all_reduce", w.group([0, 3]), bufs(), 0) == "nccl"
    w = make_world(nccl=False)
    assert w._select("all_reduce", w.group([2, 0]), bufs(), 0) == "ipc"
    assert w._select("batch_p2p", (0, 1), bufs(), 0) == "ipc"


def test_staging_that_does_not_fit_goes_to_nccl_or_raises():
    w = make_world(ring=1000, force="ipc")
    g = w.group([0, 1])
    assert w._select("all_to_all", g, bufs(), 1000) == "ipc"
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="GFCOLL_IPC_BYTES"):
        w._select("all_to_all", g, bufs(), 1001)
    w = make_world(ring=1000, nccl=False)
    assert w._select("all_to_all", w.group([0, 1]), bufs(), 1000) == "ipc"
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="GFCOLL_IPC_BYTES"):
        w._select("all_to_all", w.group([0, 1]), bufs(), 1001)


def test_forced_transports():
    w = make_world(force="nccl")
    assert w._select("all_gather", w.group([0, 1]), bufs(), 0) == "nccl"
    w = make_world(force="ipc")
    assert w._select("all_gather", w.group([0, 1]), bufs(), 0) == "ipc"
    assert w._select("batch_p2p", (0, 1), bufs(), 0) == "ipc"
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="GFCOLL_TRANSPORT=ipc"):
        w._select("all_gather", w.group([0, 3]), bufs(), 0)


def test_no_transport_for_remote_members():
    w = make_world(nccl=False)
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="ipc transport"):
        w._select("broadcast", w.group([0, 3]), bufs(), 0)


def test_wrong_device_is_refused():
    w = World(0, 2, 0, 2, torch.device("cuda", 0))
    w._ipc, w._ipc_ranks = FakeIpc(), frozenset({0, 1})
    with pytest.raises(gfcoll.GfcollValueError, match="rank's device"):
        w._select("all_reduce", w.group([0, 1]), bufs(), 0)


def test_graph_slot_checks():
    w = make_world()
    slot = w.graph_slot(2)
    assert isinstance(slot, gfcoll.GraphSlot) and slot.size == 2 and slot.rank == -1
    with pytest.raises(gfcoll.GfcollValueError, match="positive"):
        w.graph_slot(0)
    with pytest.raises(gfcoll.GfcollValueError, match="2 members"):
        slot.bind(w.group([0, 1, 2]))
    with pytest.raises(gfcoll.GfcollValueError, match="not a member"):
        slot.bind(w.group([1, 2]))
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="not reachable"):
        slot.bind(w.group([0, 3]))
    with pytest.raises(gfcoll.GfcollValueError, match="CUDA tensors"):
        slot.all_reduce(torch.zeros(4))
    with pytest.raises(gfcoll.GfcollValueError, match="root_index"):
        slot.broadcast(torch.zeros(4), 2)
    w2 = make_world(ipc=False)
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="ipc"):
        w2.graph_slot(2)
