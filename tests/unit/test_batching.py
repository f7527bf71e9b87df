"""gfdit.batching.choose_batches (Note [Choosing batches]): batches only share a model, shape, CFG mode
and expert; at most max_batch members; only when batching pays; and never a member made to miss a
deadline it would meet alone, per the cost model."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from gfdit.batching import BatchKey, batch_key, choose_batches, uses_cfg
from gfdit.cost import AnalyticCostModel, CostModel
from gfdit.policy import RunnableTask
from gfdit.request import Request
from gfdit.tasks import Task, TaskKind

COST = AnalyticCostModel()


def rt(rid, model="flux-dev", size=512, start=0, end=4, steps=28, deadline=None, arrival=0.0, **kw):
    r = Request(rid, model, width=size, height=size, num_inference_steps=steps, deadline_s=deadline,
                arrival_s=arrival, **kw)  # fmt: skip
    task = Task(rid, TaskKind.DENOISE, start, end)
    remaining = steps - start
    degrees = (1, 2, 4)
    f = r.num_frames
    step_s = {d: COST.step_time(r.model, r.width, r.height, f, d) for d in degrees}
    return RunnableTask(
        task=task, request=r, started=True, remaining_steps=remaining, layout=None, dim_size=1024,
        valid_degrees=degrees, last_ranks=(0,), runnable_since_s=arrival,
        task_s=MappingProxyType({d: task.num_steps * step_s[d] for d in degrees}),
        step_s=MappingProxyType(step_s),
        remaining_s=MappingProxyType({d: COST.remaining_time(r, task, d, remaining) for d in degrees}),
    )  # fmt: skip


def ids(batches):
    return [b.request_ids for b in batches]


def test_no_batch_across_models_shapes_or_cfg_modes():
    wan = dict(model="wan2.1-1.3b", size=480, num_frames=33)
    chunks = [
        rt("f512a"), rt("f1024a", size=1024), rt("f512b", start=3, end=7), rt("f1024b", size=1024),
        rt("w-cfg-a", guidance_scale=5.0, **wan), rt("w-nocfg", guidance_scale=1.0, **wan),
        rt("w-cfg-b", guidance_scale=4.0, start=2, end=6, **wan),
    ]  # fmt: skip
    batches = choose_batches(chunks, COST, now_s=0.0, degree=1, max_batch=8)
    assert sorted(r for b in batches for r in b.request_ids) == sorted(c.request_id for c in chunks)
    for b in batches:
        keys = {batch_key(c.request, c.task.start) for c in chunks if c.request_id in b.request_ids}
        assert keys == {b.key}
    groups = {frozenset(b.request_ids) for b in batches}
    assert {frozenset({"f512a", "f512b"}), frozenset({"w-cfg-a", "w-cfg-b"})} <= groups
    assert frozenset({"w-nocfg"}) in groups
    assert uses_cfg(chunks[4].request) and not uses_cfg(chunks[5].request)
    assert not uses_cfg(chunks[0].request)  # Flux: distilled guidance, no CFG rows


def test_experts_are_not_mixed():
    # A two-expert model switching at step 10 (Wan2.2-style): chunks on either side never share a batch.
    chunks = [rt("a", start=8, end=10), rt("b", start=10, end=12), rt("c", start=0, end=2)]
    expert = lambda r, step: "high" if step < 10 else "low"  # noqa: E731
    batches = choose_batches(chunks, COST, now_s=0.0, degree=1, max_batch=4, expert_of=expert)
    assert {frozenset(b.request_ids) for b in batches} == {frozenset({"a", "c"}), frozenset({"b"})}
    assert {b.key.expert for b in batches} == {"high", "low"}


def test_max_batch_and_the_no_batching_default():
    chunks = [rt(f"r{i}", arrival=float(i)) for i in range(7)]
    batches = choose_batches(chunks, COST, now_s=0.0, degree=1, max_batch=3)
    assert ids(batches) == [("r0", "r1", "r2"), ("r3", "r4", "r5"), ("r6",)]
    assert batches[0].seconds == pytest.approx(
        COST.batch_chunk_time("flux-dev", 512, 512, None, 1, [4, 4, 4])
    )
    assert batches[0].key == BatchKey("flux-dev", 512, 512, None, False, None)
    alone = choose_batches(chunks, COST, now_s=0.0, degree=1, max_batch=1)
    assert ids(alone) == [(f"r{i}",) for i in range(7)]


def test_nothing_is_batched_when_batching_does_not_pay():
    class NoGain(AnalyticCostModel):  # the CostModel default: B requests cost B steps
        batch_step_time = CostModel.batch_step_time

    chunks = [rt(f"r{i}", arrival=float(i)) for i in range(4)]
    assert all(b.size == 1 for b in choose_batches(chunks, NoGain(), now_s=0.0, degree=1, max_batch=4))


def test_a_tight_deadline_is_kept():
    step = COST.step_time("flux-dev", 512, 512, None, 1)
    loose = [rt(f"l{i}", arrival=float(i), deadline=1e6) for i in range(3)]
    alone = COST.remaining_time(loose[0].request, loose[0].task, 1, 28)
    # "tight" meets its deadline alone by less than what a batch of 2 adds to its chunk.
    tight = rt("tight", deadline=alone + 0.05 * step, arrival=-1.0)
    batches = choose_batches([tight, *loose], COST, now_s=0.0, degree=1, max_batch=4)
    assert ids(batches)[0] == ("tight",)
    assert ids(batches)[1] == ("l0", "l1", "l2")
    # A request that misses its deadline even alone is not protected: it may be batched.
    late = rt("late", deadline=0.5 * alone, arrival=-2.0)
    batches = choose_batches([late, *loose], COST, now_s=0.0, degree=1, max_batch=4)
    assert ids(batches) == [("late", "l0", "l1", "l2")]


@pytest.mark.parametrize("seed", range(5))
def test_random_mixes_keep_every_deadline_met_alone(seed):
    rng = random.Random(seed)
    now = 10.0
    chunks = []
    for i in range(24):
        size = rng.choice((256, 512, 1024))
        steps = rng.choice((8, 20, 28))
        start = rng.randrange(steps)
        end = min(steps, start + rng.choice((1, 2, 4)))
        probe = rt("p", size=size, start=start, end=end, steps=steps)
        alone = now + probe.remaining_s[2]
        deadline = rng.choice((None, alone * rng.uniform(0.95, 1.3)))
        chunks.append(rt(f"r{i}", size=size, start=start, end=end, steps=steps, deadline=deadline,
                         arrival=rng.uniform(0, now)))  # fmt: skip
    batches = choose_batches(chunks, COST, now_s=now, degree=2, max_batch=4)
    by_id = {c.request_id: c for c in chunks}
    assert sorted(r for b in batches for r in b.request_ids) == sorted(by_id)
    assert any(b.size > 1 for b in batches)
    for b in batches:
        assert b.size <= 4 and len({by_id[r].request.width for r in b.request_ids}) == 1
        for r in b.request_ids:
            c = by_id[r]
            d = c.request.deadline_s
            if d is None or now + c.remaining_s[2] > d:
                continue
            rest = c.remaining_s[2] - c.task_s[2]
            assert now + b.seconds + rest <= d + 1e-9, (r, b)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="max_batch"):
        choose_batches([rt("a")], COST, now_s=0.0, degree=1, max_batch=0)
    with pytest.raises(ValueError, match="twice"):
        choose_batches([rt("a"), rt("a")], COST, now_s=0.0, degree=1, max_batch=2)
    with pytest.raises(ValueError, match="degree 3"):
        choose_batches([rt("a")], COST, now_s=0.0, degree=3, max_batch=2)
    enc = rt("e")
    enc = RunnableTask(**{**enc.__dict__, "task": Task("e", TaskKind.ENCODE)})
    with pytest.raises(ValueError, match="not a DENOISE"):
        choose_batches([enc], COST, now_s=0.0, degree=1, max_batch=2)


@pytest.mark.parametrize(
    "profile, size, expected",
    [("flux-fast", 512, [1, 1, 1, 1]), ("flux-fast", 1024, [1, 1, 1, 1]),
     ("flux-eager", 512, [4]), ("flux-eager", 1024, [1, 1, 1, 1])],
)  # fmt: skip
def test_batches_form_only_where_the_measured_steps_save_enough(profile, size, expected):
    """With the one-H100 profiles of Note [Choosing batches] ("Why a margin"): the compiled + graph
    steps save at most 11.2 % per joiner and are never batched; eager 512² saves 21-27 % and is."""
    from pathlib import Path

    from gfdit.cost import apply_profile, read_profile

    path = Path(__file__).parents[2] / f"bench/results/2026-12-06-h100-s8/profile/{profile}.json"
    cost = AnalyticCostModel()
    apply_profile(cost, read_profile(str(path), model="flux-dev"))
    chunks = [rt(f"r{k}", size=size, start=0, end=2, steps=8) for k in range(4)]
    batches = choose_batches(chunks, cost, now_s=0.0, degree=1, max_batch=4)
    assert [len(b.tasks) for b in batches] == expected
