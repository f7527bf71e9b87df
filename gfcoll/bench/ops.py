"""One plugin per collective, in one registry (``OPS``), like nccl-tests' one file per collective.

A plugin says how many bytes a size moves and how they count toward bus bandwidth, how to lay out
and fill the buffers, how to run the operation with gfcoll and with the torch.distributed
baseline, and what the result must be. The driver (gfcoll.bench.driver) does everything else.

Sizes follow nccl-tests: a sweep size S (bytes) is the whole buffer of all_reduce, broadcast and
sendrecv, the OUTPUT of all_gather, the INPUT of reduce_scatter and the send buffer of all_to_all;
per-rank blocks are S / n rounded down to whole elements (at least one), and the row reports the
bytes actually used. Bus-bandwidth factors (busbw = algbw x factor, n = group size) are in
gfcoll.bench's docstring.

Check data (Note [bench check data]): member r's input is a deterministic integer pattern of its
GLOBAL rank, small enough that any sum over the group is exact in the dtype, so every rank builds
every member's input locally and compares sum/max/min bitwise; avg gets a tolerance of a few units
in the last place (implementations divide at different points).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import gfcoll

# Largest integer magnitude exactly representable (floats) or in range (integers), per dtype.
_EXACT_LIMIT = {
    torch.float32: 2**24,
    torch.float16: 2**11,
    torch.bfloat16: 2**8,
    torch.int8: 127,
    torch.uint8: 255,
    torch.int32: 2**31 - 1,
    torch.int64: 2**62,
}
# torch 2.13 renamed the tensor forms (the old names warn); older versions have only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


@dataclass(frozen=True)
class Layout:
    """Element counts of one rank's buffers for one sweep size."""

    in_numel: int
    out_numel: int  # 0: in place (the result is in the input buffer)
    nbytes: int  # the size column: bytes per nccl-tests' convention for this collective
    count: int  # elements of that size (nbytes / element size)


@dataclass
class Case:
    """Everything a plugin needs for one (collective, group, size) on this rank (a member)."""

    world: gfcoll.World
    ranks: tuple[int, ...]  # the group, in the order the user gave (gfcoll's order)
    group: gfcoll.Group
    pg: object  # the baseline's dedicated torch ProcessGroup, or None (no baseline)
    pg_ranks: tuple[int, ...]  # the baseline's member order (torch may sort ranks)
    dtype: torch.dtype
    device: torch.device
    redop: str
    layout: Layout
    inp: torch.Tensor = field(init=False)
    out: torch.Tensor = field(init=False)

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def me(self) -> int:
        return self.world.rank


def magnitude(dtype: torch.dtype, n: int) -> int:
    """Pattern values lie in [-m, m] (unsigned: [0, 2m]) so that n of them sum exactly."""
    limit = _EXACT_LIMIT[dtype]
    if dtype == torch.uint8:
        return max(1, min(8, limit // (2 * n)))
    return max(1, min(8, limit // n))


def pattern(
    rank: int, start: int, count: int, dtype: torch.dtype, device: torch.device, n: int
) -> torch.Tensor:
    """Elements [start, start + count) of member ``rank``'s check input (Note [bench check data])."""
    m = magnitude(dtype, n)
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    v = (idx * 7919 + rank * 104729 + 17) % (2 * m + 1)
    if dtype != torch.uint8:
        v -= m
    return v.to(dtype)


def poison(t: torch.Tensor, n: int) -> None:
    """Fills an output with a value outside the pattern's range, so that a no-op fails the check."""
    m = magnitude(t.dtype, n)
    t.fill_(2 * m + 1 if t.dtype == torch.uint8 else m + 1)


def reduce_ref(parts: list[torch.Tensor], redop: str, dtype: torch.dtype) -> torch.Tensor:
    """Exact reduction of integer-valued parts (int64 accumulation), rounded once to dtype."""
    acc = parts[0].to(torch.int64)
    for p in parts[1:]:
        p = p.to(torch.int64)
        if redop in ("sum", "avg"):
            acc = acc + p
        elif redop == "max":
            acc = torch.maximum(acc, p)
        else:
            acc = torch.minimum(acc, p)
    if redop == "avg":
        return (acc.to(torch.float64) / len(parts)).to(dtype)
    return acc.to(dtype)


def count_wrong(got: torch.Tensor, want: torch.Tensor, redop: str | None, n: int) -> int:
    """Number of elements that differ (bitwise, or within a few ulps for avg on floats)."""
    if got.shape != want.shape:
        return max(got.numel(), want.numel())
    if redop == "avg" and want.dtype.is_floating_point:
        tol = 2.0 * n * torch.finfo(want.dtype).eps * magnitude(want.dtype, n)
        ok = (got.to(torch.float64) - want.to(torch.float64)).abs() <= tol  # NaN counts as wrong
        return int((~ok).sum().item())
    return int((got != want).sum().item())


class Collective:
    """Plugin interface. ``order`` is the member order of the implementation being checked:
    ``case.ranks`` for gfcoll, ``case.pg_ranks`` for the baseline."""

    name = ""
    reduces = False  # uses --op
    min_group = 1  # smallest group it makes sense on

    def layout(self, nbytes: int, n: int, elem: int) -> Layout:
        count = max(1, nbytes // elem)
        return Layout(count, count, count * elem, count)

    def busbw_factor(self, n: int) -> float:
        raise NotImplementedError

    def alloc(self, case: Case) -> None:
        lay = case.layout
        case.inp = torch.empty(lay.in_numel, dtype=case.dtype, device=case.device)
        case.out = (
            torch.empty(lay.out_numel, dtype=case.dtype, device=case.device) if lay.out_numel else case.inp
        )

    def fill_timing(self, case: Case) -> None:
        """Data for the timed iterations (repeated; must stay finite)."""
        self.fill(case, case.ranks)

    def fill(self, case: Case, order: tuple[int, ...]) -> None:
        """Check data: this rank's input, and a poisoned output."""
        case.inp.copy_(pattern(case.me, 0, case.layout.in_numel, case.dtype, case.device, case.n))
        if case.out is not case.inp:
            poison(case.out, case.n)

    def run_gfcoll(self, case: Case) -> None:
        raise NotImplementedError

    def run_baseline(self, case: Case) -> None:
        raise NotImplementedError

    def expected(self, case: Case, order: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def result(self, case: Case) -> torch.Tensor:
        return case.out

    def _index(self, case: Case, order: tuple[int, ...]) -> int:
        return order.index(case.me)


class AllReduce(Collective):
    name = "all_reduce"
    reduces = True

    def layout(self, nbytes, n, elem):
        count = max(1, nbytes // elem)
        return Layout(count, 0, count * elem, count)

    def busbw_factor(self, n):
        return 2.0 * (n - 1) / n

    def fill_timing(self, case):
        # In place and repeated: a sum over random data would overflow; zeros cost the same.
        case.inp.zero_()

    def run_gfcoll(self, case):
        case.group.all_reduce(case.inp, op=case.redop)

    def run_baseline(self, case):
        dist.all_reduce(case.inp, op=_TORCH_OPS[case.redop], group=case.pg)

    def expected(self, case, order):
        parts = [pattern(r, 0, case.layout.in_numel, case.dtype, case.device, case.n) for r in order]
        return reduce_ref(parts, case.redop, case.dtype)


class AllGather(Collective):
    name = "all_gather"

    def layout(self, nbytes, n, elem):
        block = max(1, nbytes // elem // n)
        return Layout(block, block * n, block * n * elem, block * n)

    def busbw_factor(self, n):
        return (n - 1) / n

    def run_gfcoll(self, case):
        case.group.all_gather(case.out, case.inp)

    def run_baseline(self, case):
        _ALL_GATHER(case.out, case.inp, group=case.pg)

    def expected(self, case, order):
        block = case.layout.in_numel
        return torch.cat([pattern(r, 0, block, case.dtype, case.device, case.n) for r in order])


class ReduceScatter(Collective):
    name = "reduce_scatter"
    reduces = True

    def layout(self, nbytes, n, elem):
        block = max(1, nbytes // elem // n)
        return Layout(block * n, block, block * n * elem, block * n)

    def busbw_factor(self, n):
        return (n - 1) / n

    def run_gfcoll(self, case):
        case.group.reduce_scatter(case.out, case.inp, op=case.redop)

    def run_baseline(self, case):
        _REDUCE_SCATTER(case.out, case.inp, op=_TORCH_OPS[case.redop], group=case.pg)

    def expected(self, case, order):
        block = case.layout.out_numel
        start = self._index(case, order) * block
        parts = [pattern(r, start, block, case.dtype, case.device, case.n) for r in order]
        return reduce_ref(parts, case.redop, case.dtype)


class AllToAll(Collective):
    name = "all_to_all"

    def layout(self, nbytes, n, elem):
        block = max(1, nbytes // elem // n)
        return Layout(block * n, block * n, block * n * elem, block * n)

    def busbw_factor(self, n):
        return (n - 1) / n

    def run_gfcoll(self, case):
        case.group.all_to_all(case.out, case.inp)

    def run_baseline(self, case):
        dist.all_to_all_single(case.out, case.inp, group=case.pg)

    def expected(self, case, order):
        block = case.layout.in_numel // case.n
        start = self._index(case, order) * block
        return torch.cat([pattern(r, start, block, case.dtype, case.device, case.n) for r in order])


class Broadcast(Collective):
    """Root: the group's first rank in the user's order (a global rank, for both)."""

    name = "broadcast"

    def layout(self, nbytes, n, elem):
        count = max(1, nbytes // elem)
        return Layout(count, 0, count * elem, count)

    def busbw_factor(self, n):
        return 1.0

    def fill(self, case, order):
        if case.me == case.ranks[0]:
            super().fill(case, order)
        else:
            poison(case.inp, case.n)

    def run_gfcoll(self, case):
        case.group.broadcast(case.inp, case.ranks[0])

    def run_baseline(self, case):
        dist.broadcast(case.inp, src=case.ranks[0], group=case.pg)

    def expected(self, case, order):
        return pattern(case.ranks[0], 0, case.layout.in_numel, case.dtype, case.device, case.n)


class SendRecv(Collective):
    """A ring in the user's group order: each member sends its buffer to the next member and
    receives the previous member's, in one fused batch (world.batch_p2p / batch_isend_irecv)."""

    name = "sendrecv"
    min_group = 2

    def busbw_factor(self, n):
        return 1.0

    def _peers(self, case) -> tuple[int, int]:
        i = case.ranks.index(case.me)
        return case.ranks[(i + 1) % case.n], case.ranks[(i - 1) % case.n]

    def run_gfcoll(self, case):
        nxt, prev = self._peers(case)
        case.world.batch_p2p([gfcoll.P2P("send", case.inp, nxt), gfcoll.P2P("recv", case.out, prev)])

    def run_baseline(self, case):
        nxt, prev = self._peers(case)
        ops = [
            dist.P2POp(dist.isend, case.inp, nxt, group=case.pg),
            dist.P2POp(dist.irecv, case.out, prev, group=case.pg),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def expected(self, case, order):
        _, prev = self._peers(case)
        return pattern(prev, 0, case.layout.in_numel, case.dtype, case.device, case.n)


OPS: dict[str, Collective] = {
    p.name: p for p in (AllGather(), AllToAll(), AllReduce(), ReduceScatter(), Broadcast(), SendRecv())
}
