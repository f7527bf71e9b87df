"""Layouts, reshard plans and layout-aware rank choice (gfdit.layout)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfdit.layout import (
    Layout,
    LayoutKind,
    _max_weight_assignment,
    choose_ranks_for_reuse,
    even_slices,
    kept_elements,
    order_ranks_for_reuse,
    plan_reshard,
)

MAX_RANK = 8


@st.composite
def layouts(draw, dim_size: int, dim: int = 0) -> Layout:
    kind = draw(st.sampled_from(list(LayoutKind)))
    if kind is LayoutKind.OWNER:
        return Layout.owner(draw(st.integers(0, MAX_RANK - 1)), dim)
    ranks = draw(st.lists(st.integers(0, MAX_RANK - 1), min_size=1, max_size=6, unique=True))
    if kind is LayoutKind.REPLICATED:
        return Layout.replicated(ranks, dim)
    if draw(st.booleans()):
        return Layout.sharded(ranks, dim)
    # Explicit slices: random cut points tiling [0, dim_size), dealt to members in a random order.
    cuts = sorted(draw(st.lists(st.integers(0, dim_size), min_size=len(ranks) - 1, max_size=len(ranks) - 1)))
    bounds = [0, *cuts, dim_size]
    slices = [(bounds[i], bounds[i + 1]) for i in range(len(ranks))]
    order = draw(st.permutations(range(len(ranks))))
    return Layout.sharded(ranks, dim, [slices[i] for i in order])


@st.composite
def reshard_cases(draw):
    dim_size = draw(st.integers(0, 40))
    return draw(layouts(dim_size)), draw(layouts(dim_size)), dim_size


def covered(pieces, rank: int, dim_size: int) -> list[int]:
    counts = [0] * dim_size
    for p in pieces:
        if p.dst_rank == rank:
            for i in range(p.start, p.stop):
                counts[i] += 1
    return counts


@settings(max_examples=300, deadline=None)
@given(reshard_cases())
def test_every_destination_element_lands_exactly_once(case):
    src, dst, dim_size = case
    plan = plan_reshard(src, dst, dim_size)
    have = src.holdings(dim_size)
    for rank, (a, b) in dst.holdings(dim_size).items():
        counts = covered(plan.transfers + plan.local, rank, dim_size)
        assert counts == [1 if a <= i < b else 0 for i in range(dim_size)]
    for p in plan.transfers + plan.local:
        assert p.start < p.stop
        lo, hi = have[p.src_rank]  # every piece is read from a rank that holds it
        assert lo <= p.start and p.stop <= hi
    assert all(p.src_rank != p.dst_rank for p in plan.transfers)
    assert all(p.src_rank == p.dst_rank for p in plan.local)
    needed = sum(b - a for a, b in dst.member_slices(dim_size))
    assert plan.elements_moved + plan.elements_kept == needed
    assert plan.bytes_moved(12) + plan.bytes_kept(12) == 12 * needed
    assert sorted(plan.transfers, key=id) == sorted(
        [t for r in range(MAX_RANK) for t in plan.sends(r)], key=id
    )
    assert sum(len(plan.recvs(r)) for r in range(MAX_RANK)) == len(plan.transfers)


@settings(max_examples=300, deadline=None)
@given(reshard_cases())
def test_in_place_elements_never_move(case):
    src, dst, dim_size = case
    plan = plan_reshard(src, dst, dim_size)
    have = src.holdings(dim_size)
    for rank, (a, b) in dst.holdings(dim_size).items():
        if rank not in have:
            continue
        lo, hi = max(a, have[rank][0]), min(b, have[rank][1])
        received = covered(plan.transfers, rank, dim_size)
        assert all(received[i] == 0 for i in range(lo, hi)), "an element already in place was sent"
        kept = covered(plan.local, rank, dim_size)
        assert sum(kept) == max(0, hi - lo)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.data())
def test_replicated_source_spreads_load_and_prefers_self(dim_size, data):
    holders = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
    others = data.draw(st.lists(st.integers(4, 9), min_size=1, max_size=6, unique=True))
    dst_ranks = data.draw(st.permutations(holders[:1] + others))
    plan = plan_reshard(Layout.replicated(holders), Layout.sharded(dst_ranks), dim_size)
    assert all(t.dst_rank != holders[0] for t in plan.transfers)  # a holder reads from itself
    load = {h: sum(t.size for t in plan.sends(h)) for h in holders}
    biggest = max((b - a for a, b in even_slices(dim_size, len(dst_ranks))), default=0)
    assert max(load.values()) - min(load.values()) <= biggest


def test_even_slices_match_tensor_split():
    for n in range(0, 30):
        for parts in range(1, 9):
            sl = even_slices(n, parts)
            sizes = [b - a for a, b in sl]
            assert sum(sizes) == n and sl[0][0] == 0 and sl[-1][1] == n
            assert all(sl[i][1] == sl[i + 1][0] for i in range(parts - 1))
            assert sizes == [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def brute_force_kept(src, candidates, num_ranks, dim_size) -> int:
    return max(kept_elements(src, list(p), dim_size) for p in itertools.permutations(candidates, num_ranks))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 30), st.data())
def test_choose_ranks_for_reuse_is_optimal(dim_size, data):
    src = data.draw(layouts(dim_size))
    candidates = data.draw(st.lists(st.integers(0, MAX_RANK - 1), min_size=1, max_size=6, unique=True))
    num_ranks = data.draw(st.integers(1, len(candidates)))
    got = choose_ranks_for_reuse(src, candidates, num_ranks, dim_size)
    assert len(got) == num_ranks and len(set(got)) == num_ranks and set(got) <= set(candidates)
    assert kept_elements(src, got, dim_size) == brute_force_kept(src, candidates, num_ranks, dim_size)
    # The objective is what the reshard plan keeps in place.
    assert plan_reshard(src, Layout.sharded(got), dim_size).elements_kept == kept_elements(src, got, dim_size)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.data())
def test_order_ranks_for_reuse_is_an_optimal_permutation(dim_size, data):
    src = data.draw(layouts(dim_size))
    new = data.draw(st.sets(st.integers(0, MAX_RANK - 1), min_size=1, max_size=6))
    order = order_ranks_for_reuse(src, new, dim_size)
    assert sorted(order) == sorted(new)
    assert kept_elements(src, order, dim_size) == brute_force_kept(src, sorted(new), len(new), dim_size)


def test_hungarian_matches_brute_force_on_random_matrices():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 5)
        m = rng.randint(n, 6)
        w = [[rng.randint(-5, 20) for _ in range(m)] for _ in range(n)]
        cols = _max_weight_assignment(w)
        assert len(set(cols)) == n
        best = max(sum(w[i][c] for i, c in enumerate(p)) for p in itertools.permutations(range(m), n))
        assert sum(w[i][c] for i, c in enumerate(cols)) == best


def test_sp4_to_two_ranks_keeps_rank0_in_place():
    """DESIGN example SP4 [0,1,2,3] -> a 2-rank group on {0, 1}, dim 8 (slices of 2).

    The new halves are [0,4) and [4,8); ranks 0 and 1 both hold parts of [0,4), so with contiguous
    even slices only one of their quarters can stay: the optimum keeps 2 elements, rank 0 first."""
    src = Layout.sharded([0, 1, 2, 3])
    order = order_ranks_for_reuse(src, {0, 1}, 8)
    assert order == [0, 1]
    plan = plan_reshard(src, Layout.sharded(order), 8)
    assert [(t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.local] == [(0, 0, 0, 2)]
    assert plan.elements_moved == 6 and plan.elements_kept == 2
    assert sorted((t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.transfers) == [
        (1, 0, 2, 4),
        (2, 1, 4, 6),
        (3, 1, 6, 8),
    ]
    assert brute_force_kept(src, [0, 1], 2, 8) == 2
    # Free to pick which two of the four ranks: one from each half keeps both quarters in place.
    pick = choose_ranks_for_reuse(src, [0, 1, 2, 3], 2, 8)
    assert pick == [0, 2] and kept_elements(src, pick, 8) == 4


def test_sp2_to_sp4_puts_old_ranks_where_their_data_is():
    src = Layout.sharded([2, 3])  # rank 2 holds [0,4), rank 3 holds [4,8)
    order = order_ranks_for_reuse(src, [0, 1, 2, 3], 8)
    assert order.index(2) in (0, 1) and order.index(3) in (2, 3)
    plan = plan_reshard(src, Layout.sharded(order), 8)
    assert plan.elements_kept == 4 and plan.elements_moved == 4
    assert {t.dst_rank for t in plan.transfers} == {0, 1}
    assert plan.bytes_moved(256) == 4 * 256 and plan.bytes_kept(256) == 4 * 256


def test_no_state_picks_lowest_ranks_in_order():
    assert choose_ranks_for_reuse(None, [5, 3, 7, 1], 2, 100) == [1, 3]
    assert choose_ranks_for_reuse(None, [0, 1, 2, 3], 2, 8, avoid={0, 2}) == [1, 3]
    # `avoid` only breaks ties: keeping state in place comes first.
    assert choose_ranks_for_reuse(Layout.owner(2), [0, 1, 2, 3], 2, 8, avoid={0, 2}) in ([2, 1], [1, 2])
    order = order_ranks_for_reuse(Layout.owner(6), [6, 2, 4], 10)  # slices 4, 3, 3
    assert order[0] == 6 and sorted(order) == [2, 4, 6]  # the owner takes the largest slice


def test_layout_validation_errors():
    with pytest.raises(ValueError, match="duplicate"):
        Layout.sharded([0, 0])
    with pytest.raises(ValueError, match="exactly one"):
        Layout(LayoutKind.OWNER, (0, 1))
    with pytest.raises(ValueError, match="at least one"):
        Layout.replicated([])
    with pytest.raises(ValueError, match="tile"):
        Layout.sharded([0, 1], slices=[(0, 2), (3, 5)])
    with pytest.raises(ValueError, match="tile"):
        Layout.sharded([0, 1], slices=[(0, 3), (2, 5)])
    with pytest.raises(ValueError, match="slices"):
        Layout.sharded([0, 1], slices=[(0, 2)])
    with pytest.raises(ValueError, match="SHARDED"):
        Layout(LayoutKind.REPLICATED, (0, 1), slices=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="tile"):
        Layout.sharded([0, 1], slices=[(0, 2), (2, 5)]).member_slices(8)
    with pytest.raises(ValueError, match="dimensions"):
        plan_reshard(Layout.sharded([0], dim=1), Layout.sharded([1], dim=2), 4)
    with pytest.raises(ValueError, match="choose 3"):
        choose_ranks_for_reuse(None, [0, 1], 3, 8)
    with pytest.raises(ValueError, match="duplicate"):
        order_ranks_for_reuse(None, [1, 1], 8)
