"""The nccl transport on CUDA tensors (2, 4 and 8 GPUs; each size skipped where fewer are visible): the correctness matrix, agreement with
torch.distributed on a dedicated group, CuPy arrays, streams, overlapping groups, warm peers."""

import pytest

from tests.launch import run_ranks
from tests.matrix import run_matrix

pytestmark = pytest.mark.gpu
GPU_COUNTS = [2, 4, 8]


@pytest.mark.parametrize("n", GPU_COUNTS)
def test_matrix_cuda(n):
    sizes = [0, 1, 37, 65_537, 2_100_001]
    counts = run_ranks(run_matrix, n, "cuda", sizes, n, 3, device="cuda", timeout=900)
    assert all(c > 0 for c in counts)


def _against_torch(world):
    import torch
    import torch.distributed as dist

    from tests.reference import DTYPES, make_input, random_groups

    dev = world.device
    checks = 0
    for gi, ranks in enumerate(random_groups(11, world.size, 3)):
        tg = dist.new_group(sorted(ranks))  # collective: every rank calls it
        g = world.group(sorted(ranks))
        if g.rank < 0:
            continue
        n, me = g.size, g.rank
        for dtype in DTYPES:
            x = make_input(gi * 31 + DTYPES.index(dtype), me, 100_003 * n, dtype).to(dev)
            exact = not dtype.is_floating_point
            for op, top in (
                ("sum", dist.ReduceOp.SUM),
                ("max", dist.ReduceOp.MAX),
                ("min", dist.ReduceOp.MIN),
            ):
                a, b = x.clone(), x.clone()
                g.all_reduce(a, op=op)
                dist.all_reduce(b, op=top, group=tg)
                _agree(a, b, exact or op != "sum", f"all_reduce {op} {ranks} {dtype}")
                ra, rb = (
                    torch.empty(100_003, dtype=dtype, device=dev),
                    torch.empty(100_003, dtype=dtype, device=dev),
                )
                g.reduce_scatter(ra, x, op=op)
                dist.reduce_scatter_tensor(rb, x, op=top, group=tg)
                _agree(ra, rb, exact or op != "sum", f"reduce_scatter {op} {ranks} {dtype}")
                checks += 2
            oa = torch.empty(n * x.numel(), dtype=dtype, device=dev)
            ob = torch.empty_like(oa)
            g.all_gather(oa, x)
            dist.all_gather_into_tensor(ob, x, group=tg)
            _agree(oa, ob, True, f"all_gather {ranks} {dtype}")
            aa, ab = torch.empty_like(x), torch.empty_like(x)
            g.all_to_all(aa, x)
            dist.all_to_all_single(ab, x, group=tg)
            _agree(aa, ab, True, f"all_to_all {ranks} {dtype}")
            ba, bb = x.clone(), x.clone()
            root = sorted(ranks)[-1]
            g.broadcast(ba, root=root)
            dist.broadcast(bb, src=root, group=tg)
            _agree(ba, bb, True, f"broadcast {ranks} {dtype}")
            checks += 3
    torch.cuda.synchronize()
    return checks


def _agree(a, b, exact, what):
    import torch

    if exact:
        assert torch.equal(a, b), what
    else:
        # NCCL sums in its own order and precision; gfcoll in float32, group order.
        tol = 1e-5 if a.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 8, msg=what)


@pytest.mark.parametrize("n", GPU_COUNTS)
def test_agrees_with_torch_distributed(n):
    checks = run_ranks(_against_torch, n, device="cuda", torch_dist="nccl", timeout=900)
    assert all(c > 0 for c in checks)


def _cupy_and_streams(world):
    import cupy
    import torch

    r, n = world.rank, world.size
    g = world.group(list(range(n)))
    # CuPy arrays go through __cuda_array_interface__, on CuPy's current stream.
    with cupy.cuda.Device(world.device.index):
        x = cupy.full((4096,), r + 1, dtype=cupy.int32)
        g.all_reduce(x)
        cupy.cuda.get_current_stream().synchronize()
        assert int(x[0]) == n * (n + 1) // 2 and bool((x == x[0]).all())
    # Overlapping groups on two streams: {0,1} on s1 and {1,2} on s2 (rank 1 issues both).
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    a, b = world.group([0, 1]), world.group([1, 2 % n])
    ta = torch.full((1 << 20,), float(r), device=world.device)
    tb = torch.full((1 << 20,), float(10 * r), device=world.device)
    works = []
    with torch.cuda.stream(s1):
        if a.rank >= 0:
            works.append(a.all_reduce(ta, async_op=True))
    with torch.cuda.stream(s2):
        if b.rank >= 0 and n > 2:
            works.append(b.all_reduce(tb, async_op=True))
    for w in works:
        w.wait()
        w.synchronize()
        assert w.is_completed()
    if a.rank >= 0:
        assert torch.all(ta == 1.0)
    if b.rank >= 0 and n > 2:
        assert torch.all(tb == 30.0)
    # Nested groups {all} and {last two}, same relative order on the shared ranks, two streams.
    big, small = world.group(list(range(n))), world.group([n - 2, n - 1])
    tbig = torch.full((1 << 18,), r + 1, dtype=torch.int64, device=world.device)
    tsmall = torch.full((9,), 100 * r, dtype=torch.int64, device=world.device)
    with torch.cuda.stream(s1):
        w1 = big.all_reduce(tbig, async_op=True)
    with torch.cuda.stream(s2):
        w2 = small.all_reduce(tsmall, async_op=True) if small.rank >= 0 else None
    w1.synchronize()
    if w2 is not None:
        w2.synchronize()
        assert torch.all(tsmall == 100 * (2 * n - 3))
    assert torch.all(tbig == n * (n + 1) // 2)
    # CPU tensors on a CUDA world use the host transport.
    c = torch.full((33,), float(r))
    g.all_reduce(c)
    assert torch.all(c == sum(range(n)))
    return True


@pytest.mark.parametrize("n", GPU_COUNTS)
def test_cupy_streams_overlap(n):
    assert all(run_ranks(_cupy_and_streams, n, device="cuda", timeout=600))


def _first_op_on_new_group(world):
    import time

    import torch

    # Peer connections were warmed at init: the first operation on a never-seen group costs about
    # what later ones cost, not a communicator creation (hundreds of ms).
    n = world.size
    t = torch.ones(1024, device=world.device)
    world.group(list(range(n))).barrier()
    times = []
    for ranks in ([0, n - 1], [n - 1, 0], list(range(n))[::-1]):
        g = world.group(ranks)
        if g.rank >= 0:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.all_reduce(t)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        world.group(list(range(n))).barrier()
    return times


@pytest.mark.parametrize("n", GPU_COUNTS)
def test_first_operation_on_new_group_is_warm(n):
    results = run_ranks(_first_op_on_new_group, n, device="cuda", timeout=600)
    worst = max(max(ts) for ts in results if ts)
    assert worst < 0.1, f"first operation on a new group took {worst * 1e3:.1f} ms"
