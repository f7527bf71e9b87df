"""Batched denoising under Ulysses SP on 2 CPU ranks (host transport): the scenario of
tests/batch_scenario.py (three requests joining and leaving a batch at different step indices) run on
the group [0, 1] and on [1, 0] (reversed member order) equals each request alone on one rank (fp32,
<= 1e-5). One spawn per family runs both orders."""

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
    return out


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_batched_sp2_equals_solo(name):
    per_rank = run_ranks(_scenario, 2, name, timeout=240)
    for rank, res in enumerate(per_rank):
        for order, (diffs, num_calls, moved) in res.items():
            assert max(diffs) <= kTol, f"{name} rank {rank} group {order}: diffs {diffs}"
            assert num_calls == 10 and moved > 1e-3
