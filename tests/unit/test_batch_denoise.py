"""Batched denoising on one CPU rank (Note [Batched steps] in gfdit/models/batch.py): tiny-flux and
tiny-wan requests with different seeds, step counts and guidance, joining and leaving a batch at
different step indices, equal each request run alone (fp32, <= 1e-5); argument checks."""

import pytest
import torch

from gfdit.models import load_model
from gfdit.models.batch import BatchItem, batch_shape_key
from gfdit.request import Request
from tests import batch_scenario

kTol = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(name, device="cpu") for name in ("tiny-flux", "tiny-wan")}


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_batched_requests_equal_their_solo_runs(tiny, name):
    diffs, calls, moved = batch_scenario.run(tiny[name], name)
    assert max(diffs) <= kTol, f"{name}: max abs diff per request {diffs}"
    assert min(moved) > 1e-3  # every request really was denoised
    # on_step: (request, step) for every step of the batched chunks, each request's steps in order.
    expected = [(1, 1), (0, 2), (2, 1), (1, 2), (0, 3), (2, 2), (2, 3), (0, 4), (2, 4), (2, 5)]
    assert calls == expected


def test_a_batch_of_one_equals_denoise(tiny):
    diffs, _, _ = batch_scenario.run(tiny["tiny-wan"], "tiny-wan", batched_alone=True)
    assert max(diffs) <= kTol, diffs


def test_batched_rows_differ_per_request(tiny):
    """Per-request inputs really reach the forward: the same noise and prompt with different guidance
    (and, for Wan, CFG on vs off) gives different results in one batch."""
    for name, scales in (("tiny-flux", (1.5, 6.0)), ("tiny-wan", (1.0, 6.0))):
        m = tiny[name]
        reqs = [
            Request(
                f"g{k}",
                name,
                prompt="a cat",
                num_inference_steps=2,
                seed=5,
                guidance_scale=g,
                **batch_scenario.REQUESTS[name],
            )  # fmt: skip
            for k, g in enumerate(scales)
        ]
        s = m.seq_len(reqs[0])
        items = [BatchItem(r, m.init_latents(r), m.encode(r), 0, 2) for r in reqs]
        a, b = m.denoise_batch(items, (0, s))
        assert (a - b).abs().max() > 1e-4, name


def test_denoise_batch_argument_checks(tiny):
    m = tiny["tiny-flux"]
    base = dict(prompt="a cat", num_inference_steps=3, seed=1)
    r0 = Request("a", "tiny-flux", width=128, height=128, **base)
    r1 = Request("b", "tiny-flux", width=64, height=128, **base)
    c0, x0 = m.encode(r0), m.init_latents(r0)
    c1, x1 = m.encode(r1), m.init_latents(r1)
    assert batch_shape_key(m, r0) == ("tiny-flux", 1, 8, 8)
    with pytest.raises(ValueError, match="different shapes"):
        m.denoise_batch([BatchItem(r0, x0, c0, 0, 1), BatchItem(r1, x1, c1, 0, 1)], (0, 64))
    with pytest.raises(ValueError, match="twice"):
        m.denoise_batch([BatchItem(r0, x0, c0, 0, 1), BatchItem(r0, x0, c0, 1, 2)], (0, 64))
    with pytest.raises(ValueError, match="start"):
        m.denoise_batch([BatchItem(r0, x0, c0, 2, 4)], (0, 64))
    with pytest.raises(ValueError, match="tokens"):
        m.denoise_batch([BatchItem(r0, x0[:, :32], c0, 0, 1)], (0, 32))
    with pytest.raises(ValueError, match="no items"):
        m.denoise_batch([], (0, 64))
    wan = tiny["tiny-wan"]
    rw = Request("w", "tiny-wan", width=64, height=64, num_frames=5, **base)
    with pytest.raises(ValueError, match="is for 'tiny-wan'"):
        m.denoise_batch([BatchItem(rw, wan.init_latents(rw), {}, 0, 1)], (0, 64))
    # start == end: the item comes back unchanged.
    (y,) = m.denoise_batch([BatchItem(r0, x0, c0, 1, 1)], (0, 64))
    assert torch.equal(y, x0)
