"""Inputs and reference results shared by the CPU (host transport) and GPU (nccl transport) tests.

Every rank builds every member's input from a shared seed, so each rank can compute the exact
expected result locally. Reductions follow gfcoll's arithmetic (float32 accumulation in group
order, one rounding), so results are compared bitwise.
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64]
OPS = ["sum", "avg", "max", "min"]


def make_input(seed: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=g) * 4).to(dtype)
    lo, hi = {torch.uint8: (0, 256), torch.int8: (-128, 128)}.get(dtype, (-(2**20), 2**20))
    return torch.randint(lo, hi, (numel,), generator=g, dtype=torch.int64).to(dtype)


def reduce_ref(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    dtype = inputs[0].dtype
    floating = dtype.is_floating_point
    acc = inputs[0].float() if floating else inputs[0].long()
    for x in inputs[1:]:
        x = x.float() if floating else x.long()
        if op in ("sum", "avg"):
            acc = acc + x
        elif op == "max":
            acc = torch.maximum(acc, x)
        else:
            acc = torch.minimum(acc, x)
    if op == "avg":
        acc = acc / len(inputs)
    if floating:
        return acc.to(dtype)
    # Integer sums wrap around in the dtype, as two's complement truncation of the exact sum does.
    bits = torch.iinfo(dtype).bits
    wrapped = acc & ((1 << bits) - 1) if bits < 64 else acc
    if dtype != torch.uint8 and bits < 64:
        wrapped = torch.where(wrapped >= (1 << (bits - 1)), wrapped - (1 << bits), wrapped)
    return wrapped.to(dtype)


def splits_for(seed: int, n: int, rows_hint: int) -> list[list[int]]:
    """splits[i][j]: rows member i sends member j (uneven, some zero)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, rows_hint + 1, (n, n), generator=g)
    if n > 1:
        m[0, n - 1] = 0  # always exercise an empty block
    return m.tolist()


def random_groups(seed: int, world: int, count: int) -> list[list[int]]:
    """Ordered groups: the world, its reverse, and random unordered, non-contiguous subsets."""
    g = torch.Generator().manual_seed(seed)
    groups = [list(range(world)), list(reversed(range(world)))]
    for _ in range(count):
        k = int(torch.randint(1, world + 1, (1,), generator=g))
        groups.append(torch.randperm(world, generator=g)[:k].tolist())
    return groups
