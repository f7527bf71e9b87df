"""Layouts of per-request state across ranks, reshard plans between layouts, layout-aware rank choice.

Note [Layouts and reshards]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The state a request carries between tasks (its latent) is described by a `Layout`: an ordered group of
global ranks and how the state is spread over them along one tensor dimension of size `dim_size`
(the latent's token dimension):
  - SHARDED: member i holds the contiguous slice `slices[i] = (start, stop)`; the slices tile
    [0, dim_size) without overlap (empty slices allowed). By default the split is even, with the
    remainder on the first members, exactly like `torch.tensor_split(x, n, dim)`.
  - REPLICATED: every member holds all of [0, dim_size).
  - OWNER: one rank holds all of [0, dim_size).
A SHARDED layout may have `mirrors`: a second group of as many ranks, mirror i holding the same slice
as member i (the state after a CFG-parallel chunk: sharded over one half, replicated on the other;
Note [CFG-parallel] in gfdit/models/base.py). A mirrored destination needs every mirror filled too;
a mirrored source lets a destination rank that is a mirror keep its piece in place.
Moving a request to another group is a reshard: `plan_reshard(src, dst, dim_size)` lists the pieces
(src_rank, dst_rank, start, stop) every destination member must receive, and the pieces that are
already on their destination rank (`local`, copied in place, never sent). The destination is covered
exactly once. Indices are in units of the split dimension; `bytes_moved(bytes_per_index)` converts.

Which rank gets which slice is a free choice when a group is formed: `choose_ranks_for_reuse` and
`order_ranks_for_reuse` choose it so that the most elements are already where they must be (see their
docstrings for the exact objective). Workers execute plans with gfcoll point-to-point operations.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "LayoutKind",
    "Layout",
    "Transfer",
    "ReshardPlan",
    "even_slices",
    "plan_reshard",
    "kept_elements",
    "choose_ranks_for_reuse",
    "order_ranks_for_reuse",
]


class LayoutKind(enum.Enum):
    SHARDED = "sharded"  # each member holds a contiguous slice of the split dimension
    REPLICATED = "replicated"  # every member holds everything
    OWNER = "owner"  # exactly one rank holds everything


def even_slices(dim_size: int, num_parts: int) -> tuple[tuple[int, int], ...]:
    """The (start, stop) slices of `torch.tensor_split(range(dim_size), num_parts)`: the first
    `dim_size % num_parts` parts hold one element more than the others."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if dim_size < 0:
        raise ValueError(f"dim_size must be >= 0, got {dim_size}")
    base, extra = divmod(dim_size, num_parts)
    slices, start = [], 0
    for i in range(num_parts):
        stop = start + base + (1 if i < extra else 0)
        slices.append((start, stop))
        start = stop
    return tuple(slices)


@dataclass(frozen=True)
class Layout:
    """Where one piece of per-request state lives. Immutable; build with the class methods."""

    kind: LayoutKind  # how the state is spread over `ranks`
    ranks: tuple[int, ...]  # ordered, distinct global ranks of the group (one rank for OWNER)
    dim: int = 0  # tensor dimension the SHARDED slices index (informational for other kinds)
    slices: tuple[tuple[int, int], ...] | None = None  # SHARDED: (start, stop) per member; None: even
    mirrors: tuple[int, ...] | None = None  # SHARDED: mirror i holds member i's slice too; None: none

    def __post_init__(self) -> None:
        ranks = tuple(self.ranks)
        object.__setattr__(self, "ranks", ranks)
        if not ranks:
            raise ValueError("a layout needs at least one rank")
        if self.mirrors is not None:
            mirrors = tuple(self.mirrors)
            object.__setattr__(self, "mirrors", mirrors)
            if self.kind is not LayoutKind.SHARDED:
                raise ValueError(f"mirrors are only meaningful for SHARDED layouts, not {self.kind.name}")
            if len(mirrors) != len(ranks):
                raise ValueError(f"{len(ranks)} ranks but {len(mirrors)} mirrors")
            ranks = ranks + mirrors
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
            raise ValueError(f"ranks must be non-negative integers, got {ranks}")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"duplicate ranks in layout: {ranks}")
        if self.kind is LayoutKind.OWNER and len(ranks) != 1:
            raise ValueError(f"an OWNER layout has exactly one rank, got {ranks}")
        if self.slices is not None:
            if self.kind is not LayoutKind.SHARDED:
                raise ValueError(f"slices are only meaningful for SHARDED layouts, not {self.kind.name}")
            slices = tuple((int(a), int(b)) for a, b in self.slices)
            object.__setattr__(self, "slices", slices)
            if len(slices) != len(ranks):
                raise ValueError(f"{len(ranks)} ranks but {len(slices)} slices")
            if any(not (0 <= a <= b) for a, b in slices):
                raise ValueError(f"slices must satisfy 0 <= start <= stop: {slices}")
            pos = 0
            for a, b in sorted(s for s in slices if s[0] < s[1]):
                if a != pos:
                    raise ValueError(f"slices must tile [0, n) without gaps or overlaps: {slices}")
                pos = b

    @classmethod
    def sharded(
        cls,
        ranks: Sequence[int],
        dim: int = 0,
        slices: Sequence[tuple[int, int]] | None = None,
        mirrors: Sequence[int] | None = None,
    ) -> Layout:
        """Member i of `ranks` holds `slices[i]` (default: the even split of the dimension), and so
        does `mirrors[i]` if given."""
        return cls(
            LayoutKind.SHARDED,
            tuple(ranks),
            dim,
            None if slices is None else tuple(slices),
            None if mirrors is None else tuple(mirrors),
        )

    @classmethod
    def replicated(cls, ranks: Sequence[int], dim: int = 0) -> Layout:
        return cls(LayoutKind.REPLICATED, tuple(ranks), dim)

    @classmethod
    def owner(cls, rank: int, dim: int = 0) -> Layout:
        return cls(LayoutKind.OWNER, (rank,), dim)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def holders(self) -> tuple[int, ...]:
        """Every rank that holds part of the state: the members, then the mirrors."""
        return self.ranks + (self.mirrors or ())

    def member_slices(self, dim_size: int) -> tuple[tuple[int, int], ...]:
        """(start, stop) each member holds, in member order. Raises ValueError if explicit slices do
        not tile [0, dim_size)."""
        if dim_size < 0:
            raise ValueError(f"dim_size must be >= 0, got {dim_size}")
        if self.kind is not LayoutKind.SHARDED:
            return ((0, dim_size),) * len(self.ranks)
        if self.slices is None:
            return even_slices(dim_size, len(self.ranks))
        end = max((b for a, b in self.slices if a < b), default=0)
        if end != dim_size or any(b > dim_size for _, b in self.slices):
            raise ValueError(f"slices {self.slices} do not tile [0, {dim_size})")
        return self.slices

    def holdings(self, dim_size: int) -> dict[int, tuple[int, int]]:
        """rank -> (start, stop) it holds (an empty range for a member that holds nothing); mirrors
        included."""
        slices = self.member_slices(dim_size)
        out = dict(zip(self.ranks, slices, strict=True))
        if self.mirrors is not None:
            out.update(zip(self.mirrors, slices, strict=True))
        return out


@dataclass(frozen=True)
class Transfer:
    """One contiguous piece [start, stop) of the split dimension, from src_rank to dst_rank."""

    src_rank: int  # global rank that holds the piece now
    dst_rank: int  # global rank that must hold it afterwards (== src_rank for a local piece)
    start: int  # first index along the split dimension
    stop: int  # one past the last index

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ReshardPlan:
    """How to go from `src` to `dst`. Every element of every destination member's range is covered
    by exactly one piece of `transfers` + `local`; pieces of one destination are sorted by start."""

    src: Layout  # layout before
    dst: Layout  # layout after
    dim_size: int  # size of the split dimension
    transfers: tuple[Transfer, ...]  # pieces sent between ranks (src_rank != dst_rank)
    local: tuple[Transfer, ...]  # pieces already on their destination rank (src_rank == dst_rank)

    @property
    def elements_moved(self) -> int:
        return sum(t.size for t in self.transfers)

    @property
    def elements_kept(self) -> int:
        return sum(t.size for t in self.local)

    @property
    def is_noop(self) -> bool:
        """True when nothing crosses ranks (local copies may still be needed)."""
        return not self.transfers

    def bytes_moved(self, elem_bytes_per_index: int | float) -> int:
        """Bytes sent between ranks, given the bytes of state per index of the split dimension."""
        return int(round(self.elements_moved * elem_bytes_per_index))

    def bytes_kept(self, elem_bytes_per_index: int | float) -> int:
        """Bytes that stay on their rank."""
        return int(round(self.elements_kept * elem_bytes_per_index))

    def sends(self, rank: int) -> tuple[Transfer, ...]:
        """Pieces `rank` must send."""
        return tuple(t for t in self.transfers if t.src_rank == rank)

    def recvs(self, rank: int) -> tuple[Transfer, ...]:
        """Pieces `rank` must receive."""
        return tuple(t for t in self.transfers if t.dst_rank == rank)


def plan_reshard(src: Layout, dst: Layout, dim_size: int) -> ReshardPlan:
    """Plan the move of a state of `dim_size` indices from layout `src` to layout `dst`.

    Every destination member gets its slice, and so does every mirror of a mirrored `dst`.
    SHARDED source: each destination range is cut along the source slices; a piece comes from its
    member, or stays in place on a destination that is its mirror. REPLICATED/OWNER source:
    a destination member that is a holder keeps its range locally; others read their whole range from
    one holder, the least loaded so far (elements assigned), ties to the earlier holder in `src.ranks`.
    Raises ValueError when both layouts are SHARDED on different dimensions (not a 1-D reshard).
    """
    if src.kind is LayoutKind.SHARDED and dst.kind is LayoutKind.SHARDED and src.dim != dst.dim:
        raise ValueError(f"cannot reshard between dimensions {src.dim} and {dst.dim}")
    need = dst.member_slices(dim_size)
    dests = list(zip(dst.ranks, need, strict=True))
    if dst.mirrors is not None:
        dests += list(zip(dst.mirrors, need, strict=True))
    transfers: list[Transfer] = []
    local: list[Transfer] = []

    def add(s: int, d: int, a: int, b: int) -> None:
        (local if s == d else transfers).append(Transfer(s, d, a, b))

    if src.kind is LayoutKind.SHARDED:
        mirrors = src.mirrors or (None,) * src.size
        have = sorted(zip(src.member_slices(dim_size), src.ranks, mirrors, strict=True), key=lambda h: h[0])
        for d, (a, b) in dests:
            for (c, e), s, m in have:
                lo, hi = max(a, c), min(b, e)
                if lo < hi:
                    add(d if d == m else s, d, lo, hi)
    else:
        load = dict.fromkeys(src.ranks, 0)
        order = {r: i for i, r in enumerate(src.ranks)}
        for d, (a, b) in dests:
            if a == b:
                continue
            if d in load:
                add(d, d, a, b)
                continue
            s = min(src.ranks, key=lambda r: (load[r], order[r]))
            load[s] += b - a
            add(s, d, a, b)
    return ReshardPlan(src, dst, dim_size, tuple(transfers), tuple(local))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def kept_elements(src: Layout | None, order: Sequence[int], dim_size: int) -> int:
    """Elements that stay in place if the state in `src` moves to SHARDED(order) with the even split:
    the sum over positions p of |what order[p] holds in src  ∩  even_slices(dim_size, len(order))[p]|.
    This is the objective `choose_ranks_for_reuse` maximises (0 when src is None)."""
    if src is None:
        return 0
    have = src.holdings(dim_size)
    slices = even_slices(dim_size, len(order))
    return sum(_overlap(have[r], sl) for r, sl in zip(order, slices, strict=True) if r in have)


def choose_ranks_for_reuse(
    src: Layout | None,
    candidates: Iterable[int],
    num_ranks: int,
    dim_size: int,
    avoid: Iterable[int] = (),
) -> list[int]:
    """Choose `num_ranks` of `candidates` and their order for a new SHARDED group with the even split.

    Objective: maximise `kept_elements(src, order, dim_size)`, i.e. the elements of the state that are
    already on the rank that will hold them, which minimises the elements a reshard must send (the
    destination's total is fixed). Exact: a rectangular linear assignment (positions x candidates)
    solved by the Hungarian algorithm in integers, O(num_ranks^2 * len(candidates)). Among optimal
    choices, ties are broken first toward candidates not in `avoid` (e.g. ranks holding another
    request's state), then toward candidate i of the ascending candidate list sitting at position i
    (minimum sum of |i - p|), so with no state to reuse the answer is the lowest `num_ranks`
    candidates outside `avoid`, in ascending order.
    """
    cands = sorted(candidates)
    if len(set(cands)) != len(cands):
        raise ValueError(f"duplicate candidate ranks: {cands}")
    if not 1 <= num_ranks <= len(cands):
        raise ValueError(f"cannot choose {num_ranks} ranks out of {len(cands)} candidates")
    have = src.holdings(dim_size) if src is not None else {}
    avoided = set(avoid)
    slices = even_slices(dim_size, num_ranks)
    m = len(cands)
    # Integer weight = overlap * kScale + preference * kPrefer + positional, each term dominating the
    # total of all the lower ones over the num_ranks rows.
    k_prefer = num_ranks * m + 1
    k_scale = num_ranks * (k_prefer + m) + 1
    weight = [
        [
            (_overlap(have[c], slices[p]) if c in have else 0) * k_scale
            + (0 if c in avoided else k_prefer)
            + (m - abs(i - p))
            for i, c in enumerate(cands)
        ]
        for p in range(num_ranks)
    ]
    columns = _max_weight_assignment(weight)
    return [cands[j] for j in columns]


def order_ranks_for_reuse(src: Layout | None, new_ranks: Iterable[int], dim_size: int) -> list[int]:
    """Order all of `new_ranks` (which rank takes which even slice) to keep the most elements in place.

    Same objective and tie-break as `choose_ranks_for_reuse` with every rank chosen. Examples (dim 8):
    SP2 [2, 3] -> {0, 1, 2, 3} puts rank 2 on a slice inside [0, 4) and rank 3 inside [4, 8), keeping
    4 of 8 elements; SP4 [0, 1, 2, 3] -> {0, 1} gives [0, 1]: rank 0 keeps its quarter (ranks 0 and 1
    both hold parts of the new first half, so with contiguous even slices only one of them can keep).
    """
    ranks = list(new_ranks)
    return choose_ranks_for_reuse(src, ranks, len(ranks), dim_size)


def _max_weight_assignment(weight: list[list[int]]) -> list[int]:
    """Columns for each row (n rows <= m columns, distinct) maximising the total integer weight.

    Hungarian algorithm with potentials (shortest augmenting paths) on cost = -weight; exact in
    integers."""
    n, m = len(weight), len(weight[0])
    inf = float("inf")
    u = [0] * (n + 1)
    v = [0] * (m + 1)
    match = [0] * (m + 1)  # match[j]: row (1-based) assigned to column j, 0 if none
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = [inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            row = weight[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = -row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    result = [0] * n
    for j in range(1, m + 1):
        if match[j]:
            result[match[j] - 1] = j - 1
    return result
