"""Every operation, dtype and reduction on random ordered groups, 2/3/4/8 CPU processes, compared
bitwise with a reference every rank computes from a shared seed."""

import pytest

from tests.launch import run_ranks
from tests.matrix import run_matrix

# A 4 KiB window makes the mid-size messages cross many windows (Note [host protocol]).
SMALL_WINDOWS = {"GFCOLL_HOST_CHUNK_BYTES": "4096"}


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_matrix(n):
    sizes = [0, 1, 37, 3001] if n <= 4 else [0, 1, 37, 1201]
    counts = run_ranks(run_matrix, n, "cpu", sizes, n, 3 if n <= 4 else 2, env=SMALL_WINDOWS)
    assert all(c > 0 for c in counts)


def _large(world, numel):
    import torch

    from tests.reference import make_input, reduce_ref

    g = world.group(list(reversed(range(world.size))))
    n, me = g.size, g.rank
    ins = [make_input(5, k, numel, torch.float32) for k in range(n)]
    t = ins[me].clone()
    g.all_reduce(t)
    assert torch.equal(t, reduce_ref(ins, "sum"))
    out = torch.empty(n * numel)
    g.all_gather(out, ins[me])
    assert torch.equal(out, torch.cat(ins))
    big = [make_input(6, k, n * numel, torch.bfloat16) for k in range(n)]
    o = torch.empty(numel, dtype=torch.bfloat16)
    g.reduce_scatter(o, big[me], op="avg")
    assert torch.equal(o, reduce_ref([x[me * numel : (me + 1) * numel] for x in big], "avg"))
    return True


@pytest.mark.parametrize("n", [2, 4])
def test_large_messages(n):
    # 2,100,001 float32 elements: just over 8 MiB per rank, an odd count, many default windows.
    assert all(run_ranks(_large, n, 2_100_001))


def _inplace_all_gather(world):
    import torch

    g = world.group(list(range(world.size)))
    buf = torch.zeros(world.size * 10, dtype=torch.int32)
    buf[g.rank * 10 : (g.rank + 1) * 10] = torch.arange(10, dtype=torch.int32) + 100 * g.rank
    g.all_gather(buf, buf[g.rank * 10 : (g.rank + 1) * 10])
    want = torch.cat([torch.arange(10, dtype=torch.int32) + 100 * k for k in range(world.size)])
    assert torch.equal(buf, want)
    return True


def test_in_place_all_gather():
    assert all(run_ranks(_inplace_all_gather, 3))
