"""Failures across ranks: mismatched sizes, a killed peer, misuse that needs several ranks."""

import time

import pytest

from tests.launch import run_ranks

SHORT_TIMEOUT = {"GFCOLL_TIMEOUT_S": "6"}


def _mismatched_sizes(world):
    import torch

    import gfcoll

    g = world.group([0, 1])
    n = 10 if world.rank == 0 else 12  # rank 1 disagrees about the size
    out = torch.empty(2 * n)
    try:
        g.all_gather(out, torch.ones(n))
    except gfcoll.GfcollMismatchError as e:
        return ("mismatch", str(e))
    except gfcoll.GfcollTimeoutError as e:
        return ("timeout", str(e))
    return ("ok", "")


def test_mismatched_sizes_are_reported():
    results = run_ranks(_mismatched_sizes, 2, env=SHORT_TIMEOUT)
    kinds = [k for k, _ in results]
    assert "ok" not in kinds
    assert "mismatch" in kinds
    msg = next(m for k, m in results if k == "mismatch")
    assert "bytes" in msg and "expects" in msg


def _mismatched_dtypes(world):
    import torch

    import gfcoll

    g = world.group([1, 0])
    dtype = torch.float32 if world.rank == 0 else torch.int32
    try:
        g.all_reduce(torch.ones(16, dtype=dtype))
    except gfcoll.GfcollMismatchError as e:
        return "dtype" in str(e)
    except gfcoll.GfcollTimeoutError:
        return None
    return False


def test_mismatched_dtypes_are_reported():
    results = run_ranks(_mismatched_dtypes, 2, env=SHORT_TIMEOUT)
    assert False not in results and True in results


def _killed_peer(world):
    import os
    import signal

    import torch

    import gfcoll

    g = world.group([0, 1, 2])
    g.all_reduce(torch.ones(1000))  # a first operation succeeds
    # Rank 2 is killed before its part of the next operation; ranks 0 and 1 start it whether or not
    # rank 2 is gone yet, and either way it must end with the error (no timing assumed).
    t = torch.ones(1_000_000)
    if world.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        g.all_reduce(t)
    except gfcoll.GfcollTimeoutError as e:
        return (type(e).__name__, time.monotonic() - start, str(e))
    return ("completed", time.monotonic() - start, "")


def test_killed_peer_raises_timeout_error():
    results = run_ranks(_killed_peer, 3, env={"GFCOLL_TIMEOUT_S": "20"}, expect_exit={2})
    for name, elapsed, msg in results[:2]:
        assert name in ("GfcollPeerDiedError", "GfcollTimeoutError"), (name, msg)
        assert elapsed < 20, elapsed
    # The liveness check finds the dead peer long before the timeout.
    assert any(name == "GfcollPeerDiedError" and "rank 2" in msg for name, _, msg in results[:2]), results


def _timeout_without_peer(world):
    import torch

    import gfcoll

    if world.rank == 1:
        time.sleep(5)  # never joins the operation, but stays alive past rank 0's timeout
        return None
    start = time.monotonic()
    with pytest.raises(gfcoll.GfcollTimeoutError, match="GFCOLL_TIMEOUT_S"):
        world.group([0, 1]).all_reduce(torch.ones(3))
    return time.monotonic() - start


def test_silent_peer_times_out_within_limit():
    elapsed, _ = run_ranks(_timeout_without_peer, 2, env={"GFCOLL_TIMEOUT_S": "2"})
    assert 1.5 < elapsed < 10


def _misuse(world):
    import torch

    import gfcoll

    r = world.rank
    g = world.group([1, 2])
    if r == 0:
        assert g.rank == -1
        with pytest.raises(gfcoll.GfcollValueError, match="not a member"):
            g.all_reduce(torch.ones(2))
        with pytest.raises(gfcoll.GfcollValueError, match="root 2 is not a member"):
            world.group([0, 1]).broadcast(torch.ones(2), root=2)
    with pytest.raises(gfcoll.GfcollValueError, match="bad peer"):
        world.send(torch.ones(1), r)  # to itself
    with pytest.raises(gfcoll.GfcollValueError, match="bad peer"):
        world.send(torch.ones(1), 7)
    world.group([0, 1, 2]).barrier()
    return True


def test_misuse_with_several_ranks():
    assert all(run_ranks(_misuse, 3))


def _excluded_peer(world):
    import os
    import signal

    import torch

    import gfcoll

    if world.rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)  # hung, not dead: only exclusion makes operations fail fast
        return None
    world.exclude([2])
    failures = []
    start = time.monotonic()
    for what, op in [
        ("all_reduce", lambda: world.group([0, 1, 2]).all_reduce(torch.ones(3))),
        ("barrier", lambda: world.group([2, world.rank]).barrier()),
        ("send", lambda: world.send(torch.ones(3), 2)),
        ("batch_p2p", lambda: world.batch_p2p([gfcoll.P2P("recv", torch.empty(3), 2)])),
    ]:
        try:
            op()
        except gfcoll.GfcollPeerDiedError as e:
            failures.append((what, str(e)))
    elapsed = time.monotonic() - start
    t = torch.full((4,), float(world.rank + 1))
    world.group([0, 1]).all_reduce(t)  # a group without the excluded rank keeps working
    with pytest.raises(gfcoll.GfcollValueError, match="itself"):
        world.exclude([world.rank])
    return failures, elapsed, t.tolist(), sorted(world.lost_ranks)


def test_excluded_rank_fails_fast_and_groups_without_it_keep_working():
    # GFCOLL_TIMEOUT_S is long: anything that waited on the stopped rank would take 60 s.
    results = run_ranks(_excluded_peer, 3, env={"GFCOLL_TIMEOUT_S": "60"}, expect_exit={2}, timeout=120)
    for failures, elapsed, summed, lost in results[:2]:
        assert [w for w, _ in failures] == ["all_reduce", "barrier", "send", "batch_p2p"], failures
        assert all("[2]" in m and "excluded" in m for _, m in failures), failures
        assert elapsed < 1.0, elapsed
        assert summed == [3.0] * 4 and lost == [2]


def _after_a_failed_scope(_, scoped):
    """Rank 1 publishes in a unit of work that rank 0 abandons (rank 0 never issues the group's second
    all_reduce nor the receive), so rank 1's operations time out (after 1 s: its GFCOLL_TIMEOUT_S) and
    their windows stay published; then both run the next unit (rank 0 waits up to 60 s for rank 1 to
    get there). Returns (the all_reduce's result, what rank 0 received) of the second unit."""
    import contextlib
    import os

    import torch

    import gfcoll

    rank = int(os.environ["RANK"])
    os.environ["GFCOLL_TIMEOUT_S"] = "1" if rank == 1 else "60"
    world = gfcoll.init(device="cpu")
    try:
        g = world.group([0, 1])
        with world.scope(1) if scoped else contextlib.nullcontext():
            g.all_reduce(torch.ones(4))  # both issue this one
            if rank == 1:
                with pytest.raises(gfcoll.GfcollTimeoutError):
                    g.all_reduce(torch.full((4,), 100.0))  # rank 0 skipped it
                with pytest.raises(gfcoll.GfcollTimeoutError):
                    world.send(torch.full((4,), 7.0), 0)  # rank 0 skipped it
        with world.scope(2) if scoped else contextlib.nullcontext():
            x = torch.full((4,), float(rank + 1))
            g.all_reduce(x)
            got = torch.zeros(4)
            if rank == 1:
                world.send(torch.full((4,), 9.0), 0)
            else:
                world.recv(got, 1)
        return x.tolist(), got.tolist()
    finally:
        world.close()


def test_a_scope_never_matches_what_a_failed_scope_left_behind():
    # Unscoped, rank 0's next all_reduce and recv pair with rank 1's leftovers (epoch / sequence
    # numbers out of step) and read 100s and 7s without an error: Note [Scoped epochs].
    results = run_ranks(_after_a_failed_scope, 2, True, init=False)
    assert results[0] == ([3.0] * 4, [9.0] * 4), results[0]
    assert results[1][0] == [3.0] * 4, results[1]


def _scope_misuse(world):
    import gfcoll

    for bad in (0, -1, 2**31, 1.5, "1"):
        with pytest.raises(gfcoll.GfcollValueError, match="scope: tag"):
            with world.scope(bad):
                pass
    with world.scope(5):
        with pytest.raises(gfcoll.GfcollValueError, match="do not nest"):
            with world.scope(6):
                pass
    return True


def test_scope_rejects_bad_tags_and_nesting():
    assert all(run_ranks(_scope_misuse, 1))
