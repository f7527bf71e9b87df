"""Batched denoising under Ulysses SP on 2 CPU ranks (host transport): the scenario of
tests/batch_scenario.py (three requests joining and leaving a batch at different step indices) run on
the group [0, 1] and on [1, 0] (reversed member order) equals each request alone on one rank (fp32,
<= 1e-5); and the same requests changing groups between chunks (rank 0 alone -> [0, 1] -> [1, 0] ->
rank 1 alone), joining and leaving the batch there. One spawn per family runs every scenario."""

import pytest

from tests.launch import run_ranks

kTol = 1e-5


def _scenario(world, name):
    from gfdit.models import load_model
    from tests import batch_scenario

    model = load_model(name, device="cpu")
    out = {}
    for order in ([0, 1], [1, 0]):
        diffs, calls, moved = batch_scenario.run(model, name, world.group(order))
        out[tuple(order)] = (diffs, len(calls), min(moved))
    out["elastic"] = batch_scenario.run_elastic(world, model, name)
    return out


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_batched_sp2_equals_solo(name):
    per_rank = run_ranks(_scenario, 2, name, timeout=240)
    elastic = per_rank[0].pop("elastic")
    assert len(elastic) == 3 and max(elastic) <= kTol, f"{name} elastic 1 -> 2 -> 2 -> 1: diffs {elastic}"
    assert per_rank[1].pop("elastic") is None
    for rank, res in enumerate(per_rank):
        for order, (diffs, num_calls, moved) in res.items():
            assert max(diffs) <= kTol, f"{name} rank {rank} group {order}: diffs {diffs}"
            assert num_calls == 10 and moved > 1e-3


def _elastic4(world):
    from gfdit.models import load_model
    from tests import batch_scenario

    out = {}
    for name in ("tiny-flux", "tiny-wan"):
        model = load_model(name, device="cpu")
        out[name] = batch_scenario.run_elastic(world, model, name, batch_scenario.ELASTIC_CHUNKS_4)
    return out


def test_batched_requests_changing_groups_1_2_4_1_equal_solo():
    """On 4 ranks: request 0 alone on [0], all three batched on [2, 0], two batched on [3, 1, 0, 2]
    (SP4), the third alone on [1]; each equals its solo run (both families in one spawn)."""
    out = run_ranks(_elastic4, 4, timeout=300)[0]
    for name, diffs in out.items():
        assert len(diffs) == 3 and max(diffs) <= kTol, f"{name}: diffs {diffs}"
