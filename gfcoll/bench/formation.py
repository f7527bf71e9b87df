"""Group formation cost: what it takes, on each method, to get a usable group of given ranks.

Every method is measured ``--formation-reps`` times per distinct rank set of the run's groups; a
repetition's time is the maximum over the group's members (each starts right after a barrier of
the world), and a row reports the median and p10/p90 over repetitions. The first rank set of each
torch method gets one extra, untimed repetition that absorbs one-time costs (loading libraries).

Methods (``method`` key of a row):
- ``gfcoll.group``: ``world.group(ranks)``, microseconds per call (mean of WORLD_GROUP_CALLS calls
  per repetition). No communication; any rank may call it.
- ``gfcoll.first_op``: the first operation on a never-used group, ``world.group(order)`` + a
  1-element all_reduce until it is done (stream synchronised), one repetition per member order of
  the rank set (the first of them is the set's first use ever: no operation of the run touched
  those ranks together before; later orders are new groups of peers that met already). The first
  set's first use is also the run's first gfcoll operation: it pays the transport's own first-use
  costs (pages of the shared workspace touched, threads started) besides the group's.
- ``gfcoll.steady_op``: the same all_reduce on the last of those groups once used, timed the
  same way: what ``first_op`` must stay close to (the promise is no cost for a group's first use).
- ``new_group.lazy``: ``new_group(ranks)`` (which every rank of the world must call) then a first
  1-element all_reduce on the members. NCCL creates the communicator lazily at that collective:
  ncclCommInitRank among the members, the id exchanged through the store. Gloo connects in
  new_group. On CPU this row is the baseline (gloo); the NCCL rows below are n/a.
- ``nccl.init_rank``: ``new_group(ranks, device_id=...)`` with the default group unbound (Note
  [bench process groups] in driver.py): the communicator is made inside new_group by
  ncclCommInitRank among the members only; timed to new_group's return.
- ``new_group.eager``: the same repetitions, timed to the end of a first collective.
- ``nccl.world_init``: binding the default group to the device creates the world's NCCL
  communicator (what ``init_process_group(device_id=...)`` does); one sample. Needed by the next two.
- ``new_group.eager_split``: ``new_group(ranks)`` once the default group is bound: torch makes the
  communicator with ncclCommSplit of the world's (every rank takes part), + a first collective.
- ``split_group``: ``dist.split_group(split_ranks=[ranks])`` (every rank calls it) + a first collective.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from .driver import Bench, describe

log = logging.getLogger("gfcoll.bench")

# world.group costs about a microsecond: this many calls make one repetition last milliseconds.
WORLD_GROUP_CALLS = 2000

LABELS = {
    "gfcoll.group": "gfcoll world.group()",
    "gfcoll.first_op": "gfcoll first all_reduce on a new group",
    "gfcoll.steady_op": "gfcoll all_reduce, group used before",
    "new_group.lazy": "new_group + first collective (lazy init)",
    "nccl.init_rank": "ncclCommInitRank, members only (eager new_group)",
    "new_group.eager": "new_group(device_id) eager + first collective",
    "nccl.world_init": "world NCCL communicator (bind default group)",
    "new_group.eager_split": "new_group eager, ncclCommSplit + first collective",
    "split_group": "split_group + first collective",
}


def _row(
    method: str, ranks, samples: list[float] | None, reason: str | None = None, backend: str = ""
) -> dict:
    row = {
        "method": method,
        "label": LABELS[method],
        "backend": backend,
        "group": list(ranks),
        "n": len(ranks),
        "status": "ok" if samples else "n/a",
        "reason": reason,
        "reps": len(samples or []),
        "median_us": None,
        "p10_us": None,
        "p90_us": None,
        "samples_us": samples or [],
    }
    if samples:
        p10, p50, p90 = np.percentile(np.asarray(samples, dtype=np.float64), [10, 50, 90])
        row.update(median_us=float(p50), p10_us=float(p10), p90_us=float(p90))
    return row


def _destroy(pg) -> None:
    # Never destroy_process_group(None): that tears down every group, the default one included.
    if pg is None or pg == dist.GroupMember.NON_GROUP_MEMBER:
        return
    dist.destroy_process_group(pg)


def _first_collective(b: Bench, pg) -> None:
    dist.all_reduce(torch.ones(1, device=b.device), group=pg)
    b.sync()


def _sample(
    b: Bench, ranks, once: Callable[[bool], tuple[float, ...]], outputs: int, reps: int, warm: bool
) -> tuple[list[list[float]], str | None]:
    """Runs ``once(member)`` on every rank ``reps`` (+1 untimed if warm) times; returns, per
    output, the per-repetition maximum over members (µs), or the first error of any rank."""
    member = b.rank in ranks
    log.info("formation: %s on %s (%d reps)", getattr(once, "__name__", "?"), list(ranks), reps)
    local: list[list[float]] = [[] for _ in range(outputs)]
    error = None
    for rep in range(reps + (1 if warm else 0)):
        b.barrier()
        try:
            times = once(member)
        except Exception as e:
            error, times = describe(e), None
        if not b.agree(error is None):
            errors = [e for e in b.gather_objects(error) if e]
            return [], errors[0]
        if warm and rep == 0:
            continue
        for k in range(outputs):
            local[k].append(times[k] if member else 0.0)
    table = b.gather([v for k in range(outputs) for v in local[k]])
    members = [r for r in range(b.size) if r in ranks]
    n = len(local[0])
    return [[max(table[r][k * n + i] for r in members) for i in range(n)] for k in range(outputs)], None


def _first_and_steady(b: Bench, ordered: tuple[int, ...], reps: int) -> list[dict]:
    """The gfcoll.first_op and gfcoll.steady_op rows of one rank set (see the module docstring)."""
    orders = list(itertools.islice(itertools.permutations(ordered), reps))
    t = torch.ones(1, device=b.device)
    used = iter(orders)

    def timed_op(ranks) -> float:
        t0 = time.perf_counter()
        b.world.group(ranks).all_reduce(t)
        b.sync()
        return (time.perf_counter() - t0) * 1e6

    def first_once(member):
        order = next(used)  # every rank steps through the same orders
        return (timed_op(order) if member else 0.0,)

    def steady_once(member):
        return (timed_op(orders[-1]) if member else 0.0,)

    first, err = _sample(b, ordered, first_once, 1, len(orders), warm=False)
    rows = [_row("gfcoll.first_op", ordered, first[0] if first else None, err, "gfcoll")]
    steady, err = (None, err) if err else _sample(b, ordered, steady_once, 1, reps, warm=False)
    rows.append(_row("gfcoll.steady_op", orders[-1], steady[0] if steady else None, err, "gfcoll"))
    return rows


def measure(b: Bench, groups: list[tuple[int, ...]]) -> list[dict]:
    """All formation rows. Every rank calls it (new_group and split_group are world collectives)."""
    reps = b.opts.formation_reps
    sets: dict[tuple[int, ...], tuple[int, ...]] = {}
    for g in groups:
        sets.setdefault(tuple(sorted(g)), g)
    rows = []

    for ordered in sets.values():

        def group_once(member, ordered=ordered):
            t0 = time.perf_counter()
            for _ in range(WORLD_GROUP_CALLS):
                b.world.group(ordered)
            return ((time.perf_counter() - t0) * 1e6 / WORLD_GROUP_CALLS,)

        samples, err = _sample(b, ordered, group_once, 1, reps, warm=False)
        rows.append(_row("gfcoll.group", ordered, samples[0] if samples else None, err, "gfcoll"))

    for ordered in sets.values():
        rows += _first_and_steady(b, ordered, reps)

    for i, ranks in enumerate(sets):

        def lazy_once(member, ranks=ranks):
            t0 = time.perf_counter()
            pg = dist.new_group(list(ranks), backend=b.backend)
            if member:
                _first_collective(b, pg)
            dt = (time.perf_counter() - t0) * 1e6
            _destroy(pg)
            return (dt,)

        samples, err = _sample(b, ranks, lazy_once, 1, reps, warm=i == 0)
        rows.append(_row("new_group.lazy", ranks, samples[0] if samples else None, err, b.backend))

    nccl_methods = [
        "nccl.init_rank",
        "new_group.eager",
        "nccl.world_init",
        "new_group.eager_split",
        "split_group",
    ]
    if b.backend != "nccl":
        for method in nccl_methods:
            rows.append(_row(method, (), None, "no NCCL: CPU run, the baseline is gloo"))
        return rows

    if "device_id" not in inspect.signature(dist.new_group).parameters:
        for method in nccl_methods:
            rows.append(_row(method, (), None, "this torch's new_group has no device_id (eager init)"))
        return rows

    for i, ranks in enumerate(sets):

        def eager_once(member, ranks=ranks):
            t0 = time.perf_counter()
            pg = dist.new_group(list(ranks), backend="nccl", device_id=b.device)
            b.sync()
            t1 = time.perf_counter()
            if member:
                _first_collective(b, pg)
            t2 = time.perf_counter()
            _destroy(pg)
            return ((t1 - t0) * 1e6, (t2 - t0) * 1e6)

        samples, err = _sample(b, ranks, eager_once, 2, reps, warm=i == 0)
        rows.append(_row("nccl.init_rank", ranks, samples[0] if samples else None, err, "nccl"))
        rows.append(_row("new_group.eager", ranks, samples[1] if samples else None, err, "nccl"))

    # Bind the default group to the device, as init_process_group(device_id=...) does; split_group
    # refuses to run otherwise. Every later new_group is then eager and split from it.
    world_ranks = tuple(range(b.size))

    def bind_once(member):
        pg = dist.distributed_c10d._get_default_group()
        t0 = time.perf_counter()
        pg.bound_device_id = b.device
        pg._get_backend(b.device).eager_connect_single_device(b.device)
        b.sync()
        return ((time.perf_counter() - t0) * 1e6,)

    samples, bind_err = _sample(b, world_ranks, bind_once, 1, 1, warm=False)
    rows.append(_row("nccl.world_init", world_ranks, samples[0] if samples else None, bind_err, "nccl"))
    if bind_err:
        log.warning("binding the default group failed (%s): split rows are n/a", bind_err)

    for i, ranks in enumerate(sets):
        if bind_err:
            rows.append(_row("new_group.eager_split", ranks, None, f"default group not bound: {bind_err}"))
            continue

        def split_new_once(member, ranks=ranks):
            t0 = time.perf_counter()
            pg = dist.new_group(list(ranks), backend="nccl")
            if member:
                _first_collective(b, pg)
            dt = (time.perf_counter() - t0) * 1e6
            _destroy(pg)
            return (dt,)

        samples, err = _sample(b, ranks, split_new_once, 1, reps, warm=i == 0)
        rows.append(_row("new_group.eager_split", ranks, samples[0] if samples else None, err, "nccl"))

    split = getattr(dist, "split_group", None)
    for i, ranks in enumerate(sets):
        if split is None or bind_err or not b.opts.split_group:
            if not b.opts.split_group:
                # Seen on 4 x H100, torch 2.11: the first split_group of the world after the rows
                # above never returned (2 GPUs were fine). Opt in with --split-group.
                reason = "not measured (opt in with --split-group)"
            elif split is None:
                reason = "this torch has no dist.split_group"
            else:
                reason = f"default group not bound: {bind_err}"

            rows.append(_row("split_group", ranks, None, reason))
            continue
        # Split only the NCCL backend: the child gets a group name hashed from its ranks, reused by
        # every repetition, and NCCL's split (unlike gloo's) reads nothing from the store under it.
        kwargs = {"backend": "nccl"} if "backend" in inspect.signature(split).parameters else {}

        def split_once(member, ranks=ranks, kwargs=kwargs):
            t0 = time.perf_counter()
            pg = split(split_ranks=[list(ranks)], **kwargs)
            if member:
                _first_collective(b, pg)
            dt = (time.perf_counter() - t0) * 1e6
            if member:
                _destroy(pg)
            return (dt,)

        samples, err = _sample(b, ranks, split_once, 1, reps, warm=i == 0)
        rows.append(_row("split_group", ranks, samples[0] if samples else None, err, "nccl"))
    return rows
