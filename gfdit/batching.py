"""Which ready DENOISE chunks to run together as one batch (Note [Batched steps] in
gfdit/models/batch.py): a pure function of the runnable requests and the cost model, for policies.

Note [Choosing batches]
~~~~~~~~~~~~~~~~~~~~~~~
`choose_batches(runnable, cost, now_s=..., degree=..., max_batch=...)` partitions the runnable DENOISE
chunks and returns every one of them in exactly one `Batch` (a batch of one is a chunk alone):
  - Only chunks with the same `BatchKey` share a batch: model, width, height, frames (one token grid),
    CFG mode (Wan: a negative-prompt row per request or none) and expert (Wan2.2's high/low-noise
    transformer, from `expert_of(request, step)`; None for single-expert models).
  - Within a key, chunks are taken most urgent first (earliest deadline, then arrival, then id); each
    unassigned chunk starts a batch and the later ones join it in order while
      (1) the batch has fewer than max_batch members;
      (2) batching pays: the batched chunk with the newcomer costs less than the batch without it plus
          the newcomer's chunk alone by at least kMinBatchSaving of that chunk alone
          (CostModel.batch_chunk_time; with a cost model that knows nothing of batching, B steps cost
          B steps and nothing is ever batched);
      (3) no member misses a deadline that it would meet alone, per the cost model: a member that
          alone finishes by its deadline (now + remaining_time at `degree`) must still finish by it
          when its chunk runs batched (now + batched chunk + the rest of its trajectory alone).
          Members that would miss alone are not protected (they cannot be made later than "missed").
    A chunk that cannot join is left for a later batch of the same key.
  - Batches come back most urgent first (by their first member). The members of a batch share one
    group of `degree` ranks; each member keeps its own chunk length (the batch shrinks as members
    finish, Note [Batched steps]).
max_batch = 1 gives every chunk alone, in urgency order: no batching.

Why a margin in (2). Members of a batch all finish at its end, where served one after another the
first would finish early: at saturation a batch that saves little work raises the mean latency more
than its throughput lowers it. Measured on one H100 (bench/results/2026-12-06-h100-s8/profile,
`gfdit profile --batch-sizes 1,2,3,4`), what the k-th member of a flux-dev batch saves of its step
alone (k = 2, 3, 4): compiled + graph-replayed 11.2 / 4.4 / 10.8 % at 512² and -1.2 / 4.0 / 0.1 % at
1024²; eager 27.0 / 21.1 / 21.1 % at 512² and 1.4 / 2.7 / 2.8 % at 1024². A serving A/B on the fast path
whose policy batched 98 % of its chunks on such savings gave 1.03x the throughput of the unbatched
server with the mean latency 19 % higher (ibid., batching-fast); eager, an earlier A/B gave 1.35x with
the mean and P99 latency lower (bench/results/2026-12-06-h100-s7). kMinBatchSaving = 0.15 sits
between: at these sizes the fast path is not batched and eager 512² is.

The time a member waits while others run is not modelled here: like the "alone" it is compared with,
the batch is assumed to start now. A policy that cannot run every batch at once decides the order.

`choose_encode_ahead` makes the other batching decision, whether a batch should first wait for a
request that is not yet encoded (Note [Encoding ahead for batches] in gfdit/policy.py), with the same
conditions (2) and (3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gfdit.cost import CostModel
from gfdit.request import Request
from gfdit.tasks import Task, TaskKind

if TYPE_CHECKING:  # policies import this module
    from gfdit.policy import RunnableTask

__all__ = [
    "BatchKey",
    "Batch",
    "batch_key",
    "batchable",
    "uses_cfg",
    "choose_batches",
    "choose_encode_ahead",
    "kBatchedFamilies",
    "kMinBatchSaving",
]

# Model families whose models denoise in batches (Note [Batched steps]); Wan2.2 (two experts) and
# Qwen-Image refuse, so a policy never batches them.
kBatchedFamilies = frozenset({"flux", "wan"})
# Condition (2) of Note [Choosing batches]: a member joins a batch only if that saves at least this
# fraction of its chunk alone.
kMinBatchSaving = 0.15


@dataclass(frozen=True)
class BatchKey:
    """What the members of one batch share (Note [Choosing batches])."""

    model: str  # model preset
    width: int  # pixels
    height: int  # pixels
    frames: int | None  # video frames; None for images
    cfg: bool  # classifier-free guidance rows (Wan with guidance_scale > 1)
    expert: Hashable = None  # the transformer of a multi-expert model at the chunk's first step; None


@dataclass(frozen=True)
class Batch:
    """One batched DENOISE chunk: the members run together on one group of `degree` ranks."""

    key: BatchKey  # what the members share
    tasks: tuple[Task, ...]  # each member's DENOISE chunk, most urgent first
    degree: int  # the group size it was costed at
    seconds: float  # estimated seconds of the whole batched chunk (CostModel.batch_chunk_time)

    @property
    def size(self) -> int:
        return len(self.tasks)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(t.request_id for t in self.tasks)


def uses_cfg(request: Request) -> bool:
    """True when the request's model runs classifier-free guidance rows for it (its preset uses CFG and
    guidance_scale > 1). Models known only to the cost model (no preset) run none."""
    from gfdit.models.presets import get_preset  # pure Python, no torch

    try:
        preset = get_preset(request.model)
    except ValueError:
        return False
    return bool(preset.uses_cfg) and request.guidance_scale > 1.0


def batchable(request: Request) -> bool:
    """True when the request's model denoises in batches (its preset's family is in kBatchedFamilies);
    False for models known only to the cost model (no preset)."""
    from gfdit.models.presets import get_preset  # pure Python, no torch

    try:
        preset = get_preset(request.model)
    except ValueError:
        return False
    return preset.family in kBatchedFamilies


def batch_key(
    request: Request, step: int, expert_of: Callable[[Request, int], Hashable] | None = None
) -> BatchKey:
    """The BatchKey of `request`'s chunk starting at `step`."""
    expert = None if expert_of is None else expert_of(request, step)
    return BatchKey(
        request.model, request.width, request.height, request.num_frames, uses_cfg(request), expert
    )


def _urgency(rt: RunnableTask) -> tuple:
    d = rt.request.deadline_s
    return (d is None, d if d is not None else 0.0, rt.request.arrival_s, rt.request_id)


def choose_batches(
    runnable: Iterable[RunnableTask],
    cost: CostModel,
    *,
    now_s: float,
    degree: int,
    max_batch: int,
    expert_of: Callable[[Request, int], Hashable] | None = None,
) -> list[Batch]:
    """Note [Choosing batches]. `runnable`: the ready requests whose next task is DENOISE (each chunk as
    listed: task.start .. task.end); `degree`: the SP degree of the group the batches would run on (it
    must be a valid degree of every chunk); `max_batch` >= 1. Returns every chunk in exactly one Batch."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    chunks = list(runnable)
    seen: set[str] = set()
    for rt in chunks:
        if rt.kind is not TaskKind.DENOISE:
            raise ValueError(f"choose_batches: {rt.task} is not a DENOISE chunk")
        if rt.request_id in seen:
            raise ValueError(f"choose_batches: request {rt.request_id!r} is listed twice")
        seen.add(rt.request_id)
        if degree not in rt.valid_degrees:
            raise ValueError(
                f"choose_batches: degree {degree} is not valid for {rt.request_id!r} (valid: {rt.valid_degrees})"
            )
    by_key: dict[BatchKey, list[RunnableTask]] = {}
    for rt in sorted(chunks, key=_urgency):
        by_key.setdefault(batch_key(rt.request, rt.task.start, expert_of), []).append(rt)
    batches: list[tuple[tuple, Batch]] = []
    for key, group in by_key.items():
        left = list(group)
        while left:
            members = [left.pop(0)]
            seconds = _chunk_time(cost, key, degree, members)
            rest = []
            for rt in left:
                if len(members) < max_batch:
                    trial = [*members, rt]
                    trial_s = _chunk_time(cost, key, degree, trial)
                    alone_s = _chunk_time(cost, key, degree, [rt])
                    saved_s = seconds + alone_s - trial_s
                    pays = saved_s > 0 and saved_s >= kMinBatchSaving * alone_s
                    if pays and _deadlines_hold(cost, trial, trial_s, now_s, degree):
                        members, seconds = trial, trial_s
                        continue
                rest.append(rt)
            left = rest
            batch = Batch(key, tuple(m.task for m in members), degree, seconds)
            batches.append((_urgency(members[0]), batch))
    batches.sort(key=lambda item: item[0])
    return [b for _, b in batches]


def choose_encode_ahead(
    batch: Sequence[RunnableTask],
    waiting: Iterable[RunnableTask],
    cost: CostModel,
    *,
    now_s: float,
    degree: int,
    max_batch: int,
    first_chunk: Callable[[RunnableTask], int],
) -> RunnableTask | None:
    """Note [Encoding ahead for batches] (gfdit/policy.py): the request of `waiting` to encode now on
    the group of `degree` ranks that `batch` would run on, so that it joins the batch at the next
    rescheduling point; None to run the batch now. `batch`: the DENOISE chunks about to run together
    (one BatchKey; each `task` the chunk as it would run); `waiting`: requests whose next task is
    ENCODE; `first_chunk(rt)`: the steps of a waiting request's first DENOISE chunk. Most urgent first."""
    members = list(batch)
    if not members:
        raise ValueError("choose_encode_ahead: an empty batch")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    key = batch_key(members[0].request, members[0].task.start)
    for m in members:
        if m.kind is not TaskKind.DENOISE or batch_key(m.request, m.task.start) != key:
            raise ValueError(f"choose_encode_ahead: {m.task} is not a DENOISE chunk of batch key {key}")
    if len(members) >= max_batch:
        return None
    batch_s = _chunk_time(cost, key, degree, members)
    waiting = list(waiting)
    for rt in waiting:
        if rt.kind is not TaskKind.ENCODE:
            raise ValueError(f"choose_encode_ahead: {rt.task} is not an ENCODE task")

    def order(rt: RunnableTask) -> tuple:  # those that can still meet their deadline first
        d = rt.request.deadline_s
        alone_s = cost.remaining_time(rt.request, rt.task, degree, rt.remaining_steps)
        return (d is not None and now_s + alone_s > d, *_urgency(rt))

    same = [rt for rt in waiting if degree in rt.valid_degrees and batch_key(rt.request, 0) == key]
    for rt in sorted(same, key=order):
        steps = first_chunk(rt)
        if not isinstance(steps, int) or not 1 <= steps <= rt.remaining_steps:
            raise ValueError(f"first_chunk of {rt.request_id!r}: {steps!r} not in [1, {rt.remaining_steps}]")
        joiner = dataclasses.replace(rt, task=Task(rt.request_id, TaskKind.DENOISE, 0, steps))
        trial = [*members, joiner]
        trial_s = _chunk_time(cost, key, degree, trial)
        joiner_s = _chunk_time(cost, key, degree, [joiner])
        saved_s = batch_s + joiner_s - trial_s
        encode_s = cost.task_time(rt.task, rt.request, degree)
        # (2) batching pays, and the group's ranks save more than they spend on the encode beyond
        # the one rank that would encode the request anyway.
        if (
            saved_s <= 0
            or saved_s < kMinBatchSaving * joiner_s
            or degree * saved_s <= (degree - 1) * encode_s
        ):
            continue
        # (3) as choose_batches checks it (this chunk batched, then alone), and with the batch staying
        # together to the end, as an encode-ahead that refills it makes it.
        before_s = {rt.request_id: cost.task_time(rt.task, rt.request, 1)}  # as remaining_time counts it
        if _deadlines_hold(
            cost, trial, trial_s, now_s, degree, delay_s=encode_s, before_s=before_s
        ) and _deadlines_hold_in_lockstep(cost, key, trial, now_s, degree, encode_s, before_s):
            return rt
    return None


def _chunk_time(cost: CostModel, key: BatchKey, degree: int, members: Sequence[RunnableTask]) -> float:
    steps = [m.task.num_steps for m in members]
    return cost.batch_chunk_time(key.model, key.width, key.height, key.frames, degree, steps)


def _deadlines_hold(
    cost: CostModel,
    members: Sequence[RunnableTask],
    batch_s: float,
    now_s: float,
    degree: int,
    *,
    delay_s: float = 0.0,
    before_s: Mapping[str, float] | None = None,
) -> bool:
    """Condition (3) of Note [Choosing batches] for every member of a candidate batch that starts
    `delay_s` after now. `before_s`: request id -> seconds of its tasks before its chunk when it runs
    alone from now (the ENCODE of a request encoded ahead, Note [Encoding ahead for batches])."""
    before_s = before_s or {}
    for m in members:
        deadline = m.request.deadline_s
        if deadline is None:
            continue
        r = m.request
        alone_rest = cost.remaining_time(r, m.task, degree, m.remaining_steps)  # from its chunk on
        if now_s + before_s.get(m.request_id, 0.0) + alone_rest > deadline:
            continue  # misses alone: not protected
        alone_chunk = m.task.num_steps * cost.step_time(r.model, r.width, r.height, r.num_frames, degree)
        end_s = now_s + delay_s + batch_s + (alone_rest - alone_chunk)
        if end_s > deadline + 1e-12 * max(1.0, abs(deadline)):
            return False
    return True


def _deadlines_hold_in_lockstep(
    cost: CostModel,
    key: BatchKey,
    members: Sequence[RunnableTask],
    now_s: float,
    degree: int,
    delay_s: float,
    before_s: Mapping[str, float],
) -> bool:
    """Condition (3) of Note [Encoding ahead for batches] with each member's whole remaining
    trajectory batched: the members start `delay_s` after now and run all their remaining steps in
    lockstep (the batch shrinking as members finish), so member m ends its steps after
    batch_chunk_time of min(n_k, n_m) steps of every member k, then runs the rest (DECODE) alone."""
    for m in members:
        deadline = m.request.deadline_s
        if deadline is None:
            continue
        r = m.request
        alone_rest = cost.remaining_time(r, m.task, degree, m.remaining_steps)
        if now_s + before_s.get(m.request_id, 0.0) + alone_rest > deadline:
            continue  # misses alone: not protected
        n = m.remaining_steps
        steps_s = cost.batch_chunk_time(
            key.model, key.width, key.height, key.frames, degree, [min(k.remaining_steps, n) for k in members]
        )
        after_s = alone_rest - n * cost.step_time(r.model, r.width, r.height, r.num_frames, degree)
        if now_s + delay_s + steps_s + after_s > deadline + 1e-12 * max(1.0, abs(deadline)):
            return False
    return True
