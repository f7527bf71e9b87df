"""Batched denoising replayed from step graphs on one GPU (Note [Batched steps] in gfdit/models/batch.py,
Note [Step graphs] in gfdit/runtime/graphs.py): tiny-flux and tiny-wan requests joining and leaving a
batch equal their solo eager runs, and graphs are cached per batch size (fp32, one process, no gfcoll)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_batched_steps_replayed_from_graphs_equal_solo_eager(name):
    from gfdit.models import load_model
    from gfdit.runtime.graphs import StepGraphs
    from tests import batch_scenario

    model = load_model(name, device="cuda")
    eager, _, _ = batch_scenario.run(model, name)
    model.step_graphs = StepGraphs("cuda")
    replayed, _, _ = batch_scenario.run(model, name)  # the solo references run through graphs as well
    replayed_again, _, _ = batch_scenario.run(model, name)  # every batch size replays
    assert max(eager) < 1e-4 and max(replayed) < 1e-4 and max(replayed_again) < 1e-4
    sizes = model.step_graphs.batch_sizes()
    assert set(sizes) == {1, 2, 3}, sizes
