"""Ordering rules of gfcoll.world (rules 1-4): overlapping groups in flight at once, from async ops
and from threads, in orders that differ between ranks, on the host transport."""

from tests.launch import run_ranks


def _overlap_pairs(world):
    # {0,1} and {1,2} in flight at once on rank 1, issued in both orders over the iterations.
    import torch

    a, b = world.group([0, 1]), world.group([1, 2])
    r = world.rank
    for it in range(6):
        ta = torch.full((50_000,), float(r + it), dtype=torch.float32)
        tb = torch.full((50_000,), float(10 * r + it), dtype=torch.float32)
        works = []
        if r == 1:
            order = [(a, ta), (b, tb)] if it % 2 == 0 else [(b, tb), (a, ta)]
            works = [g.all_reduce(t, async_op=True) for g, t in order]
        elif r == 0:
            works = [a.all_reduce(ta, async_op=True)]
        elif r == 2:
            works = [b.all_reduce(tb, async_op=True)]
        for w in works:
            w.wait()
            assert w.is_completed()
        if r in (0, 1):
            assert torch.all(ta == float(0 + it) + float(1 + it)), ta[:3]
        if r in (1, 2):
            assert torch.all(tb == float(10 + it) + float(20 + it)), tb[:3]
    return True


def test_overlapping_pairs_async():
    assert all(run_ranks(_overlap_pairs, 3))


def _nested_opposite_order(world):
    # {0,1,2,3} and {2,3}: ranks 2 and 3 issue the two groups' operations in OPPOSITE orders.
    import torch

    big, small = world.group([0, 1, 2, 3]), world.group([3, 2])
    r = world.rank
    tb = torch.full((300_001,), r + 1, dtype=torch.int64)
    ts = torch.full((7,), 100 * (r + 1), dtype=torch.int64)
    if r == 2:
        works = [big.all_reduce(tb, async_op=True), small.all_reduce(ts, async_op=True)]
    elif r == 3:
        works = [small.all_reduce(ts, async_op=True), big.all_reduce(tb, async_op=True)]
    else:
        works = [big.all_reduce(tb, async_op=True)]
    for w in works:
        w.wait()
    assert torch.all(tb == 1 + 2 + 3 + 4)
    if r in (2, 3):
        assert torch.all(ts == 300 + 400)
    return True


def test_nested_groups_opposite_order():
    assert all(run_ranks(_nested_opposite_order, 4))


def _threads(world):
    # Every pair group of the world driven by its own thread, all at once, many iterations.
    import itertools
    import threading

    import torch

    r, n = world.rank, world.size
    pairs = [p for p in itertools.combinations(range(n), 2) if r in p]
    errors = []

    def worker(pair):
        g = world.group(list(pair))
        try:
            for it in range(8):
                out = torch.empty(2 * 1000, dtype=torch.int32)
                g.all_gather(out, torch.full((1000,), 1000 * r + it, dtype=torch.int32))
                want = torch.cat([torch.full((1000,), 1000 * p + it, dtype=torch.int32) for p in pair])
                assert torch.equal(out, want), (pair, it)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(pairs)


def test_threads_on_overlapping_groups():
    assert run_ranks(_threads, 4) == [3, 3, 3, 3]


def _pipelined_same_group(world):
    # Several async operations on ONE group issued back to back before any wait (rule 1).
    import torch

    g = world.group(list(range(world.size)))
    ts = [torch.full((20_000,), float(k + world.rank), dtype=torch.float32) for k in range(6)]
    works = [g.all_reduce(t, async_op=True) for t in ts]
    for w in reversed(works):
        w.wait()
    for k, t in enumerate(ts):
        assert torch.all(t == sum(float(k + q) for q in range(world.size)))
    return True


def test_pipelined_async_same_group():
    assert all(run_ranks(_pipelined_same_group, 3))


def _p2p_order(world):
    # Messages between an ordered pair match in issue order (rule 4), even when sent async.
    import torch

    if world.rank == 0:
        works = [
            world.batch_p2p([__import__("gfcoll").P2P("send", torch.tensor([k]), 1)], async_op=True)
            for k in range(5)
        ]
        for w in works:
            w.wait()
        return []
    got = []
    for _ in range(5):
        t = torch.zeros(1, dtype=torch.int64)
        world.recv(t, 0)
        got.append(int(t))
    return got


def test_p2p_messages_match_in_order():
    assert run_ranks(_p2p_order, 2) == [[], [0, 1, 2, 3, 4]]
