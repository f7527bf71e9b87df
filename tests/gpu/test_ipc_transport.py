"""The ipc transport on CUDA tensors with 2 and 4 ranks (and 8 where 8 GPUs are visible), on any
number of GPUs (one GPU included: ranks are placed round-robin and share it). Forced with GFCOLL_TRANSPORT=ipc so that a machine
with several GPUs tests ipc too, not nccl."""

import pytest
import torch

from tests.launch import run_ranks
from tests.matrix import run_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.ipc]
RANKS = [2, 4] + ([8] if torch.cuda.is_available() and torch.cuda.device_count() >= 8 else [])
IPC = {"GFCOLL_TRANSPORT": "ipc"}


def _transports(world):
    return world.transports()


def _chunked_and_one_shot(world):
    """Sizes above the per-operation staging (chunked) and both all_reduce algorithms."""
    import torch

    from tests.reference import make_input, reduce_ref

    n = world.size
    g = world.group(list(range(n))[::-1])
    checks = 0
    for numel in (1000, 70_000, 9_000_001):  # one-shot, two-shot, two-shot in several chunks
        for dtype in (torch.float32, torch.bfloat16, torch.int32):
            ins = [make_input(numel % 97, k, numel, dtype) for k in range(n)]
            t = ins[g.rank].cuda()
            g.all_reduce(t)
            assert torch.equal(t.cpu(), reduce_ref(ins, "sum")), (numel, dtype)
            out = torch.empty(numel * n, dtype=dtype, device="cuda")
            g.all_gather(out, ins[g.rank].cuda())
            assert torch.equal(out.cpu(), torch.cat(ins)), (numel, dtype)
            checks += 2
    torch.cuda.synchronize()
    return checks


@pytest.mark.parametrize("n", RANKS)
def test_chunked_and_two_shot(n):
    # A 32 MiB workspace: 6 MiB per chunk, so the largest size runs in several chunks.
    env = dict(IPC, GFCOLL_IPC_BYTES=str(32 << 20))
    assert all(c > 0 for c in run_ranks(_chunked_and_one_shot, n, device="cuda", timeout=600, env=env))


def _opposite_orders(world):
    """Two overlapping groups, each on its own stream, issued in opposite orders on different
    ranks (NCCL would deadlock: rule 3 does not apply to ipc). The stream issued first is held
    back by a long kernel so that the second group's operation runs first on some ranks."""
    import torch

    r, n = world.rank, world.size
    a = world.group(list(range(n)))
    b = world.group(list(range(n))[::-1])
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    ok = 0
    for it in range(20):
        with torch.cuda.stream(s1):  # made on the stream that uses them
            ta = torch.full((1 << 16,), float(r + it), device="cuda")
        with torch.cuda.stream(s2):
            tb = torch.full((1 << 10,), r * 3 + it, dtype=torch.int64, device="cuda")
        order = [(a, s1, ta), (b, s2, tb)]
        if (r + it) % 2:
            order.reverse()
        works = []
        for k, (grp, s, t) in enumerate(order):
            with torch.cuda.stream(s):
                if k == 0:
                    torch.cuda._sleep(200_000)  # delays the first-issued op on this rank's GPU stream
                works.append(grp.all_reduce(t, async_op=True))
        for w in works:
            w.synchronize()
        assert torch.all(ta == float(sum(range(n)) + n * it))
        assert torch.all(tb == 3 * sum(range(n)) + n * it)
        ok += 1
    world.check()
    return ok


@pytest.mark.parametrize("n", RANKS)
def test_overlapping_groups_opposite_orders_two_streams(n):
    # Also where ranks share a GPU: this deadlocked there until gfcoll loaded its kernels at init
    # (Note [ipc signalling], "Loading").
    env = dict(IPC, GFCOLL_TIMEOUT_S="60")
    assert run_ranks(_opposite_orders, n, device="cuda", timeout=300, env=env) == [20] * n


def _stress(world, num_ops):
    """num_ops operations (counted over the world) on random ordered groups of 2..n ranks, on two
    streams chosen by group, every result checked on the GPU (no sync per op)."""
    import random

    import torch

    n = world.size
    rng = random.Random(1234)  # same sequence on every rank
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    bads = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]  # one per stream
    torch.cuda.synchronize()
    issued = 0
    keep = []
    for step in range(num_ops):
        k = rng.randint(2, n)
        ranks = rng.sample(range(n), k)
        op = rng.choice(["all_reduce", "all_gather", "broadcast", "all_to_all", "reduce_scatter", "p2p"])
        numel = rng.choice([1, 7, 64, 1000, 4099])
        sidx = hash(tuple(ranks)) % 2  # a group always on the same stream (rule 3 on one stream)
        g = world.group(ranks)
        if g.rank < 0:
            continue
        me = g.rank
        with torch.cuda.stream(streams[sidx]):  # every tensor is made on the stream that uses it
            base = torch.arange(numel, device="cuda", dtype=torch.int64)

        def val(member, base=base, step=step, ranks=ranks):
            return (base * (member + 3) + step * 17 + ranks[member]) % 100_003

        bad = bads[sidx]
        with torch.cuda.stream(streams[sidx]):
            if op == "all_reduce":
                t = val(me).to(torch.int32)
                g.all_reduce(t)
                want = sum(val(j) for j in range(k)).to(torch.int32)
                bad += (t != want).sum()
            elif op == "all_gather":
                out = torch.empty(k * numel, dtype=torch.int64, device="cuda")
                g.all_gather(out, val(me))
                bad += (out != torch.cat([val(j) for j in range(k)])).sum()
            elif op == "broadcast":
                root = ranks[step % k]
                t = val(me)
                g.broadcast(t, root)
                bad += (t != val(ranks.index(root))).sum()
            elif op == "all_to_all":
                inp = torch.cat([val(me)[:1] + 1000 * j for j in range(k)])  # one row per member
                out = torch.empty_like(inp)
                g.all_to_all(out, inp)
                bad += (out != torch.cat([val(j)[:1] + 1000 * me for j in range(k)])).sum()
            elif op == "reduce_scatter":
                inp = torch.cat([val(me) + j for j in range(k)]).to(torch.float32)
                out = torch.empty(numel, dtype=torch.float32, device="cuda")
                g.reduce_scatter(out, inp, op="max")
                want = torch.stack([val(j) + me for j in range(k)]).max(0).values.to(torch.float32)
                bad += (out != want).sum()
            else:  # a ring of point-to-point messages inside the group
                import gfcoll

                got = torch.empty(numel, dtype=torch.int64, device="cuda")
                world.batch_p2p(
                    [
                        gfcoll.P2P("send", val(me), ranks[(me + 1) % k]),
                        gfcoll.P2P("recv", got, ranks[(me - 1) % k]),
                    ]
                )
                bad += (got != val((me - 1) % k)).sum()
            keep.append(base)
        issued += 1
        if len(keep) > 256:
            torch.cuda.synchronize()
            keep.clear()
    torch.cuda.synchronize()
    world.check()
    return issued, int(sum(int(b) for b in bads))


@pytest.mark.timeout(240)
def test_stress_10000_ops_random_overlapping_groups():
    n = 4
    results = run_ranks(_stress, n, 10_000, device="cuda", timeout=600, env=IPC)
    assert all(b == 0 for _, b in results), results
    assert sum(i for i, _ in results) >= 2 * 10_000  # every op has at least two members


def _graph_slot(world):
    """One CUDA graph captured once on a slot, replayed on several groups of the same size; in
    each round every rank is in exactly one group, so groups replay concurrently on one slot."""
    import torch

    r, n = world.rank, world.size
    size = 2
    if n == 2:
        rounds = [[[0, 1]], [[1, 0]], [[0, 1]]]
    else:
        rounds = [[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 1], [2, 0]], [[0, 3], [1, 2]]]
    slot = world.graph_slot(size)
    numel = 3000
    x = torch.empty(numel, device="cuda")
    gathered = torch.empty(size * numel, device="cuda")
    rs_out = torch.empty(numel // size, device="cuda")
    bc = torch.empty(numel, dtype=torch.int32, device="cuda")
    red = torch.empty(numel, device="cuda")

    def body():
        red.copy_(x)
        slot.all_reduce(red)
        slot.all_gather(gathered, x)
        slot.reduce_scatter(rs_out, x)
        slot.broadcast(bc, 1)

    def fill(group_ranks):
        x.copy_(torch.arange(numel, device="cuda", dtype=torch.float32) * (r + 1))
        bc.fill_(100 + r)

    def expect(group_ranks):
        xs = [torch.arange(numel, dtype=torch.float32) * (q + 1) for q in group_ranks]
        me = group_ranks.index(r)
        assert torch.equal(red.cpu(), xs[0] + xs[1])
        assert torch.equal(gathered.cpu(), torch.cat(xs))
        half = numel // size
        assert torch.equal(
            rs_out.cpu(), xs[0][me * half : (me + 1) * half] + xs[1][me * half : (me + 1) * half]
        )
        assert torch.all(bc.cpu() == 100 + group_ranks[1])

    stream = torch.cuda.Stream()
    mine = [next(gr for gr in rnd if r in gr) for rnd in rounds]
    # Eager use of the slot first (the table decides there too), then capture once.
    with torch.cuda.stream(stream):
        slot.bind(world.group(mine[0]))
        fill(mine[0])
        body()
    stream.synchronize()
    expect(mine[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    replays = 0
    for gr in mine:
        with torch.cuda.stream(stream):
            fill(gr)
            slot.bind(world.group(gr))
            graph.replay()
        stream.synchronize()
        expect(gr)
        replays += 1
    world.check()
    return replays, len({tuple(g) for g in mine})


@pytest.mark.parametrize("n", RANKS)
def test_graph_captured_once_replayed_on_several_groups(n):
    results = run_ranks(_graph_slot, n, device="cuda", timeout=300, env=IPC)
    assert all(rep >= 3 for rep, _ in results)
    if n >= 4:
        assert all(distinct >= 3 for _, distinct in results), results


def _killed_peer(world, timeout_s):
    import faulthandler
    import os
    import signal
    import sys
    import time

    faulthandler.enable()  # a crash of a survivor shows where it happened

    def say(what):
        print(f"[rank {world.rank}] {what}", file=sys.stderr, flush=True)

    import torch

    import gfcoll

    r, n = world.rank, world.size
    g = world.group(list(range(n)))
    t = torch.ones(1 << 12, device="cuda")
    g.all_reduce(t)
    g.barrier()
    note = torch.zeros(1)
    if r == n - 1:
        # Dies while the others wait in their next operation: each tells it (over the host
        # transport) once that operation is issued.
        for q in range(n - 1):
            world.recv(note, q)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    g.all_reduce(t)  # rank n - 1 never takes part
    world.send(note, n - 1)
    say("issued")
    torch.cuda.synchronize()  # returns once the watchdog released the stream waits
    say("synchronized")
    with pytest.raises(gfcoll.GfcollPeerDiedError) as err:
        world.check()
    torch.cuda.synchronize()  # the CUDA context of the survivor is intact
    elapsed = time.monotonic() - t0
    say(f"raised after {elapsed:.3f} s: {err.value}")
    assert f"rank {n - 1}" in str(err.value), str(err.value)
    with pytest.raises(gfcoll.GfcollPeerDiedError):  # the transport stays failed
        g.all_reduce(t)
    assert elapsed < timeout_s, elapsed
    return elapsed


@pytest.mark.parametrize("n", RANKS)
def test_killed_peer_ends_waits_with_error(n):
    timeout_s = 20.0
    env = dict(IPC, GFCOLL_TIMEOUT_S=str(timeout_s))
    results = run_ranks(_killed_peer, n, timeout_s, device="cuda", timeout=120, env=env, expect_exit=[n - 1])
    assert all(e is not None and e < timeout_s for e in results[: n - 1]), results


def _silent_peer(world, timeout_s):
    import time

    import torch

    import gfcoll

    r, n = world.rank, world.size
    g = world.group(list(range(n)))
    t = torch.ones(64, device="cuda")
    if r == n - 1:
        # Alive but silent: takes no part, and stays alive past the survivors' bound.
        time.sleep(timeout_s * 3)
        return None
    t0 = time.monotonic()
    g.all_reduce(t)
    done = torch.cuda.Event()
    done.record()
    # Bounded: poll the stream's completion, so that a release that does not come fails with what
    # the transport knew (its recorded failure) instead of hanging the test.
    while not done.query():
        if time.monotonic() - t0 > timeout_s + 20:
            try:
                world.check()
                state = "the watchdog recorded no failure"
            except gfcoll.GfcollError as e:
                state = f"the watchdog recorded {type(e).__name__}: {e}"
            raise AssertionError(
                f"the stream was not released {timeout_s + 20} s after the operation; {state}"
            )
        time.sleep(0.01)
    with pytest.raises(gfcoll.GfcollTimeoutError) as err:
        world.check()
    assert "GFCOLL_TIMEOUT_S" in str(err.value)
    return time.monotonic() - t0


def test_silent_peer_times_out():
    n, timeout_s = 2, 3.0
    env = dict(IPC, GFCOLL_TIMEOUT_S=str(timeout_s))
    results = run_ranks(_silent_peer, n, timeout_s, device="cuda", timeout=60, env=env)
    assert timeout_s <= results[0] < timeout_s + 5, results


def _forced_nccl_on_shared_gpu(world):
    import gfcoll

    with pytest.raises(gfcoll.GfcollValueError, match="share a GPU"):
        gfcoll.init(device="cuda")
    return True


def test_nccl_refused_when_ranks_share_a_gpu():
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("ranks share a GPU only when there are fewer GPUs than ranks")
    assert all(run_ranks(_forced_nccl_on_shared_gpu, 2, init=False, env={"GFCOLL_TRANSPORT": "nccl"}))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", RANKS)
def test_matrix_ipc(n):
    """Every op x dtype x size (0, 1, odd, >= 8 MiB) x random ordered groups, bitwise against
    tests/reference.py; send/recv and batch_p2p included."""
    sizes = [0, 1, 37, 65_537, 2_100_001]
    counts = run_ranks(run_matrix, n, "cuda", sizes, n + 20, 3, device="cuda", timeout=900, env=IPC)
    assert all(c > 0 for c in counts)
    assert all("ipc" in t for t in run_ranks(_transports, n, device="cuda", env=IPC))
