"""Single-process checks of gfcoll: build info, group maths, argument checking, errors."""

import pytest
import torch

import gfcoll
from tests.launch import free_port


@pytest.fixture(scope="module")
def world():
    w = gfcoll.init(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), device="cpu")
    yield w
    w.close()


def test_build_info():
    info = gfcoll.build_info()
    assert "host" in info["transports"]
    assert set(info) >= {"transports", "cuda", "nccl_header", "nccl_runtime"}
    if "nccl" in info["transports"]:
        assert info["cuda"] is not None and info["nccl_header"].count(".") == 2


def test_world_attributes(world):
    assert (world.rank, world.size, world.local_rank, world.local_size) == (0, 1, 0, 1)
    assert world.device == torch.device("cpu")
    assert world.transports() == ["host"]


def test_group_is_local_and_ordered(world):
    g = world.group([0])
    assert g.ranks == (0,) and g.size == 1 and g.rank == 0
    assert world.group([0]).ranks == g.ranks


@pytest.mark.parametrize(
    "ranks,match",
    [
        ([], "at least one"),
        ([0, 0], "duplicate rank 0"),
        ([1], "out of range"),
        ([-1], "out of range"),
        (["0"], "integers"),
        ([0.5], "integers"),
    ],
)
def test_bad_groups(world, ranks, match):
    with pytest.raises(gfcoll.GfcollValueError, match=match):
        world.group(ranks)


def test_single_rank_collectives(world):
    # Outputs start poisoned (NaN), so an operation that writes nothing fails the test.
    g = world.group([0])
    x = torch.arange(6, dtype=torch.float32)

    def poisoned():
        return torch.full((6,), float("nan"))

    out = poisoned()
    g.all_gather(out, x)
    assert torch.equal(out, x)
    t = x.clone()
    g.all_reduce(t, op="avg")
    assert torch.equal(t, x)
    out = poisoned()
    g.reduce_scatter(out, x, op="max")
    assert torch.equal(out, x)
    out = poisoned()
    g.all_to_all(out, x)
    assert torch.equal(out, x)
    t = x.clone()
    g.broadcast(t, root=0)
    assert torch.equal(t, x)  # the root keeps its data
    g.barrier()
    t = x.clone()
    w = g.all_reduce(t, op="sum", async_op=True)
    w.wait()
    assert w.is_completed() and torch.equal(t, x)


def test_tensor_checks(world):
    g = world.group([0])
    with pytest.raises(gfcoll.GfcollValueError, match="contiguous"):
        g.all_reduce(torch.ones(4, 4).t())
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="float64"):
        g.all_reduce(torch.ones(4, dtype=torch.float64))
    with pytest.raises(gfcoll.GfcollUnsupportedError, match="avg"):
        g.all_reduce(torch.ones(4, dtype=torch.int32), op="avg")
    with pytest.raises(gfcoll.GfcollValueError, match="unknown op"):
        g.all_reduce(torch.ones(4), op="prod")
    with pytest.raises(gfcoll.GfcollValueError, match="expected a torch tensor"):
        g.all_reduce([1.0, 2.0])
    with pytest.raises(gfcoll.GfcollValueError, match="meta"):
        g.all_reduce(torch.ones(4, device="meta"))
    with pytest.raises(gfcoll.GfcollValueError, match="dtypes differ"):
        g.all_gather(torch.empty(4, dtype=torch.int32), torch.ones(4))
    with pytest.raises(gfcoll.GfcollValueError, match="expected 1 x 3"):
        g.all_gather(torch.empty(4), torch.ones(3))
    with pytest.raises(gfcoll.GfcollValueError, match="expected 1 x 4"):
        g.reduce_scatter(torch.empty(4), torch.ones(5))
    with pytest.raises(gfcoll.GfcollValueError, match="in_splits has 2 entries"):
        g.all_to_all(torch.empty(4), torch.ones(4), in_splits=[2, 2])
    with pytest.raises(gfcoll.GfcollValueError, match="sums to 3"):
        g.all_to_all(torch.empty(4), torch.ones(4), in_splits=[3], out_splits=[4])
    with pytest.raises(gfcoll.GfcollValueError, match="root 3 is not a member"):
        g.broadcast(torch.ones(2), root=3)
    with pytest.raises(gfcoll.GfcollValueError, match="P2P"):
        world.batch_p2p([("send", torch.ones(1), 0)])
    with pytest.raises(gfcoll.GfcollValueError, match="'put'"):
        world.batch_p2p([gfcoll.P2P("put", torch.ones(1), 0)])


def test_use_after_close():
    w = gfcoll.init(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), device="cpu")
    g = w.group([0])
    w.close()
    w.close()  # idempotent
    assert w.closed
    with pytest.raises(gfcoll.GfcollClosedError):
        g.all_reduce(torch.ones(2))
    with pytest.raises(gfcoll.GfcollClosedError):
        w.send(torch.ones(1), 0)


def test_init_argument_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(gfcoll.GfcollValueError, match="rank and world size"):
        gfcoll.init()
    with pytest.raises(gfcoll.GfcollValueError, match="out of range"):
        gfcoll.init(rank=3, world_size=2)
    with pytest.raises(gfcoll.GfcollValueError, match="'cuda' or 'cpu'"):
        gfcoll.init(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), device="meta")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(gfcoll.GfcollValueError, match="RANK"):
        gfcoll.init(world_size=1)
