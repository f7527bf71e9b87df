"""gfcoll collectives as torch custom operators, so that torch.compile traces code that calls them.

Note [Traceable groups]
~~~~~~~~~~~~~~~~~~~~~~~
A ``gfcoll.Group`` is a Python object that torch.compile cannot pass to a compiled graph, and whose rank
list, if the traced code read it, would be baked into the graph as constants (a recompilation for every
new group). ``traceable(group)`` returns a ``TracedGroup``: the same collective methods, with

  - ``size`` and ``rank`` (this process's member index) as plain ints: the traced code may shape tensors
    with them, so a compiled graph is specialised on (group size, member index), nothing else;
  - ``handle``: a CPU int64 tensor ``[world key, rank_0, ..., rank_{d-1}]``. It is an ordinary graph
    input; its values are read only when the operator runs, never at trace time.

So one compiled graph serves every group of the same size in which this rank has the same member index:
dynamo guards on tensor shapes and dtypes, not on values (tests/multiproc/test_compile.py runs three
groups through one graph under ``torch._dynamo.config.error_on_recompile``).

Each operator writes into its ``out`` argument and declares the mutation (``mutates_args``); its fake
kernel does nothing, since ``out`` already has its shape. They run exactly the ``Group`` methods of the
same names (same ordering rules and stream semantics: gfcoll.world); a CUDA graph captured around them
captures the transport's kernels for the group the handle names at capture time, so such a graph is
tied to that rank list (the ipc transport's group-agnostic graphs lift this; Note [Step graphs] in
gfdit/runtime/graphs.py). ``out`` and ``inp`` that are not contiguous are handled through a contiguous
copy (inductor keeps the strides the traced code gave them, so this does not happen on the hot path).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from .errors import GfcollClosedError, GfcollValueError
from .world import Group, World

__all__ = ["TracedGroup", "traceable"]

_lock = threading.Lock()
_keys = itertools.count(1)
_worlds: weakref.WeakValueDictionary[int, World] = weakref.WeakValueDictionary()  # key -> world
_world_keys: weakref.WeakKeyDictionary[World, int] = weakref.WeakKeyDictionary()
_groups: dict[tuple[int, ...], Group] = {}  # handle values -> Group (the Group also pins its world)


class TracedGroup:
    """A group as torch.compile sees it (Note [Traceable groups]). Made by ``traceable``; its methods
    mirror ``gfcoll.Group``'s (all members call them, in the same order)."""

    def __init__(self, group: Group, handle: torch.Tensor):
        self.group = group  # the eager Group (not for use inside compiled code)
        self.size = group.size
        self.rank = group.rank
        self.handle = handle

    def __repr__(self) -> str:
        return f"TracedGroup(ranks={list(self.group.ranks)}, rank={self.rank})"

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        torch.ops.gfcoll.all_gather(out, inp, self.handle)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """Even split of dim 0 (no splits: a compiled graph must not depend on split values)."""
        torch.ops.gfcoll.all_to_all(out, inp, self.handle)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum") -> None:
        torch.ops.gfcoll.reduce_scatter(out, inp, self.handle, op)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> None:
        torch.ops.gfcoll.all_reduce(t, self.handle, op)

    def broadcast(self, t: torch.Tensor, root: int) -> None:
        """``root`` is a GLOBAL rank of a member, as in Group.broadcast."""
        torch.ops.gfcoll.broadcast(t, self.handle, root)


def traceable(group: Group) -> TracedGroup:
    """The TracedGroup of ``group`` (this rank must be a member). Costs a dictionary look-up after the
    first call for a world; call it outside compiled code and pass the result in. A TracedGroup is
    returned as it is."""
    if isinstance(group, TracedGroup):
        return group
    if group.rank < 0:
        raise GfcollValueError(f"traceable: rank {group.world.rank} is not a member of {list(group.ranks)}")
    world = group.world
    with _lock:
        key = _world_keys.get(world)
        if key is None:
            key = next(_keys)
            _world_keys[world] = key
            _worlds[key] = world
        values = (key, *group.ranks)
        _groups.setdefault(values, group)
    return TracedGroup(group, torch.tensor(values, dtype=torch.int64))


def _group(handle: torch.Tensor) -> Group:
    values = tuple(handle.tolist())
    g = _groups.get(values)
    if g is None:
        world = _worlds.get(values[0])
        if world is None:
            raise GfcollClosedError(f"gfcoll op: the world of group handle {list(values)} is gone")
        g = world.group(values[1:])
        with _lock:
            _groups[values] = g
    return g


def _run_into(out: torch.Tensor, fn) -> None:
    """fn(dst) writes into a contiguous dst; copies back when out is not contiguous."""
    if out.is_contiguous():
        fn(out)
        return
    tmp = out.contiguous()
    fn(tmp)
    out.copy_(tmp)


@torch.library.custom_op("gfcoll::all_gather", mutates_args=("out",))
def _all_gather(out: torch.Tensor, inp: torch.Tensor, handle: torch.Tensor) -> None:
    g = _group(handle)
    _run_into(out, lambda o: g.all_gather(o, inp.contiguous()))


@torch.library.custom_op("gfcoll::all_to_all", mutates_args=("out",))
def _all_to_all(out: torch.Tensor, inp: torch.Tensor, handle: torch.Tensor) -> None:
    g = _group(handle)
    _run_into(out, lambda o: g.all_to_all(o, inp.contiguous()))


@torch.library.custom_op("gfcoll::reduce_scatter", mutates_args=("out",))
def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, handle: torch.Tensor, op: str) -> None:
    g = _group(handle)
    _run_into(out, lambda o: g.reduce_scatter(o, inp.contiguous(), op=op))


@torch.library.custom_op("gfcoll::all_reduce", mutates_args=("t",))
def _all_reduce(t: torch.Tensor, handle: torch.Tensor, op: str) -> None:
    g = _group(handle)
    _run_into(t, lambda o: g.all_reduce(o, op=op))


@torch.library.custom_op("gfcoll::broadcast", mutates_args=("t",))
def _broadcast(t: torch.Tensor, handle: torch.Tensor, root: int) -> None:
    g = _group(handle)
    _run_into(t, lambda o: g.broadcast(o, root))


# Fake (meta) kernels: every operator writes into a tensor the caller allocated, so there is nothing to
# compute; the shapes are checked by the real kernel (gfcoll.world raises GfcollValueError).
@_all_gather.register_fake
def _(out, inp, handle):
    return None


@_all_to_all.register_fake
def _(out, inp, handle):
    return None


@_reduce_scatter.register_fake
def _(out, inp, handle, op):
    return None


@_all_reduce.register_fake
def _(t, handle, op):
    return None


@_broadcast.register_fake
def _(t, handle, root):
    return None
