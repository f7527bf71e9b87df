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


def _batch_ctx(m, name, scales):
    reqs = [
        Request(
            f"k{k}",
            name,
            prompt="a cat",
            num_inference_steps=2,
            seed=k,
            guidance_scale=g,
            **batch_scenario.REQUESTS[name],
        )  # fmt: skip
        for k, g in enumerate(scales)
    ]
    x = torch.cat([m.init_latents(r) for r in reqs])
    t = torch.stack([m.timesteps(r).timesteps[0] for r in reqs])
    return x, t, m._prepare_batch([m.encode(r) for r in reqs], reqs, None)


def test_step_graph_keys_include_the_batch_size(tiny):
    """Note [Step graphs]: a captured step is keyed by batch size; requests of the same batch size and
    layout share a key whatever their values (guidance, timesteps, seeds)."""
    from gfdit.runtime.graphs import step_key

    m = tiny["tiny-flux"]
    keys = {}
    for b, scales in ((1, (3.5,)), (2, (3.5, 2.0)), (2, (1.0, 9.0)), (3, (1.0, 2.0, 3.0))):
        x, t, ctx = _batch_ctx(m, "tiny-flux", scales)
        keys.setdefault(b, set()).add(step_key(m, x, t, ctx, None))
    assert {b: len(k) for b, k in keys.items()} == {1: 1, 2: 1, 3: 1}
    assert {next(iter(k))[2] for k in keys.values()} == {1, 2, 3}  # the batch-size field
    # A request alone through denoise() (scalar t) and a batch of one are distinct entries.
    req = batch_scenario.make_requests("tiny-flux")[0]
    solo = m._prepare(m.encode(req), req, None)
    x1 = m.init_latents(req)
    assert step_key(m, x1, m.timesteps(req).timesteps[0], solo, None) not in keys[1]
    # Wan: the CFG layout (which rows have an unconditional twin) is part of the key.
    w = tiny["tiny-wan"]
    all_cfg = step_key(w, *_batch_ctx(w, "tiny-wan", (5.0, 3.0)), None)
    mixed = step_key(w, *_batch_ctx(w, "tiny-wan", (5.0, 1.0)), None)
    assert all_cfg != mixed and all_cfg[2] == mixed[2] == 2
    assert all_cfg == step_key(w, *_batch_ctx(w, "tiny-wan", (2.0, 7.0)), None)


def test_warm_runs_every_batch_size(tiny):
    from gfdit.models.compile import warm

    rows = warm(tiny["tiny-flux"], [64], batch_sizes=(1, 3))
    assert [(r["width"], r["batch"]) for r in rows] == [(64, 1), (64, 3)]
    assert all(r["seconds"] > 0 for r in rows)
    with pytest.raises(ValueError, match="batch sizes"):
        warm(tiny["tiny-flux"], [64], batch_sizes=(0,))
