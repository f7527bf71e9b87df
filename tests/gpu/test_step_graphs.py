"""CUDA-graph replay of denoising steps on one GPU (Note [Step graphs] in gfdit/runtime/graphs.py):
replayed steps equal eager ones, shapes are cached separately, the bound evicts the least recently
used graph, and compiled + replayed steps equal eager (tiny-flux, fp32, one process, no gfcoll)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _setup(size):
    from gfdit.breakdown import synthetic_cond
    from gfdit.models import load_model
    from gfdit.request import Request

    model = load_model("tiny-flux", device="cuda", components=("transformer",))
    req = Request("g", "tiny-flux", "x", width=size, height=size, num_inference_steps=4, seed=3)
    return model, req, synthetic_cond(model, req), model.init_latents(req)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_replayed_steps_equal_eager_and_evict():
    from gfdit.breakdown import synthetic_cond
    from gfdit.request import Request
    from gfdit.runtime.graphs import StepGraphs

    model, req, cond, x = _setup(128)
    n = x.shape[1]
    ref = model.denoise(x, (0, n), cond, 0, 4, req)
    model.step_graphs = StepGraphs("cuda", max_graphs=1)
    got = model.denoise(x, (0, n), cond, 0, 4, req)  # step 0 captures, steps 1-3 replay
    s = model.step_graphs.stats()
    assert s["captures"] == 1 and s["graphs"] == 1 and s["bytes"] > 0
    assert _rel(got, ref) < 1e-5
    again = model.denoise(x, (0, n), cond, 0, 4, req)  # all replays
    assert model.step_graphs.stats()["captures"] == 1
    assert _rel(again, ref) < 1e-5
    req2 = Request("g2", "tiny-flux", "x", width=256, height=128, num_inference_steps=2, seed=3)
    x2 = model.init_latents(req2)
    model.denoise(x2, (0, x2.shape[1]), synthetic_cond(model, req2), 0, 2, req2)
    s = model.step_graphs.stats()
    assert s["captures"] == 2 and s["graphs"] == 1 and s["evictions"] == 1


def test_compiled_and_replayed_steps_equal_eager():
    from gfdit.models.compile import compile_model
    from gfdit.runtime.graphs import StepGraphs

    model, req, cond, x = _setup(128)
    n = x.shape[1]
    ref = model.denoise(x, (0, n), cond, 0, 4, req)
    compile_model(model, "regional")
    model.step_graphs = StepGraphs("cuda")
    got = model.denoise(x, (0, n), cond, 0, 4, req)
    assert _rel(got, ref) < 1e-4
