"""tiny-qwen-image on CPU ranks (host transport): Ulysses SP over groups of 2 and 4 (shuffled orders) and a
request moved 1 -> 2 -> 4 -> 1 between chunks equal the single-rank run (fp32, <= 1e-5), with true CFG;
the elastic engine gives the single-rank result; and a 2-rank `gfdit serve` maps the HTTP fields
(guidance_scale -> true_cfg_scale, negative_prompt) onto the model: its image equals the one computed
here on one rank from the same request."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.launch import run_ranks
from tests.multiproc.test_engine import _elastic_equals_single
from tests.multiproc.test_server import _healthy, _png, _start, kStartTimeoutS
from tests.multiproc.test_sp_attention import _sp_scenarios

NAME = "tiny-qwen-image"
kTol = 1e-5
# 128x128: 8x8 = 64 latent tokens; 4 heads; true CFG (two transformer passes per step).
SP_REQ = dict(width=128, height=128, guidance_scale=4.0, negative_prompt="blurry")


def test_sp_groups_and_chunks_match_single_rank():
    per_rank = run_ranks(_sp_scenarios, 4, NAME, SP_REQ, 4, timeout=240)
    for rank, diffs in enumerate(per_rank):
        for key in ("sp2", "sp4[0, 1, 2, 3]", "sp4[2, 0, 3, 1]"):
            assert diffs[key] <= kTol, f"rank {rank} {key}: max abs diff {diffs[key]:.3g}"
    assert per_rank[1]["chunked"] <= kTol, f"1->2->4->1: max abs diff {per_rank[1]['chunked']:.3g}"


def test_elastic_engine_matches_single_rank():
    kwargs = {"width": 64, "height": 64, "guidance_scale": 4.0, "negative_prompt": "dark"}
    out = run_ranks(_elastic_equals_single, 4, NAME, kwargs, timeout=300)[0]
    for rid in ("elastic", "elastic-b"):
        latent_diff, pixel_diff, reshards, moved, groups = out[rid]
        assert latent_diff <= kTol, (rid, latent_diff)
        assert pixel_diff <= 1, (rid, pixel_diff)
        assert reshards >= 4 and moved > 0, (rid, reshards, moved)
    assert out["elastic"][4][1:5] == [(2,), (3, 1), (2, 0, 3, 1), (0,)]
    assert out["shape"] == (1, 64, 64, 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("qwen-server"))
    config = (NAME, "fcfs-elastic:max_sp=2", ["--chunk-steps", "2", "--max-steps", "50"])
    s = _start("qwen", tmp, config)
    try:
        s = _healthy(s, tmp, time.monotonic() + kStartTimeoutS, config)
        yield s
    finally:
        s.stop()


def _image(url: str, **body) -> np.ndarray:
    body = {"prompt": "a red fox in the snow", "size": "128x128", "num_inference_steps": 3, "seed": 5, **body}
    r = httpx.post(url + "/v1/images/generations", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return _png(r.json()["data"][0]["b64_json"])


def _local(prompt, guidance, negative):
    import torch

    from gfdit.models import load_model
    from gfdit.request import Request

    m = load_model(NAME, device="cpu")
    req = Request("x", NAME, prompt, width=128, height=128, num_inference_steps=3, seed=5,
                  guidance_scale=guidance, negative_prompt=negative)  # fmt: skip
    m.validate(req)
    with torch.no_grad():
        y = m.denoise(m.init_latents(req), (0, m.seq_len(req)), m.encode(req), 0, 3, req)
    return m.decode(y, req)[0].numpy()


def test_http_guidance_scale_is_true_cfg_scale_and_negative_prompt_reaches_the_model(server):
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    got = _image(server.url, guidance_scale=8.0, negative_prompt="fog")
    want = _local("a red fox in the snow", 8.0, "fog")
    assert got.shape == (128, 128, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # SP2 vs one rank: rounding at most
    # Another negative prompt, or no guidance, is another image: both fields reach the model. (The tiny
    # random VAE shrinks latent differences; these two move some pixel by 7-8 levels.)
    other_neg = _image(server.url, guidance_scale=8.0, negative_prompt="a bright sunny day at the beach")
    unguided = _image(server.url, guidance_scale=1.0, negative_prompt="fog")
    assert np.abs(other_neg.astype(int) - got.astype(int)).max() >= 4
    assert np.abs(unguided.astype(int) - got.astype(int)).max() >= 4
    assert np.abs(unguided.astype(int) - _local("a red fox in the snow", 1.0, None).astype(int)).max() <= 1
    # The preset's default size.
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a fox", "num_inference_steps": 1},
                   timeout=180)  # fmt: skip
    assert r.status_code == 200, r.text
    assert _png(r.json()["data"][0]["b64_json"]).shape == (128, 128, 3)
    bad = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a fox", "size": "120x128"},
                     timeout=30)  # fmt: skip
    assert bad.status_code == 400 and "multiple of 16" in bad.text


def test_engine_compiled_regional_matches_eager_single_rank():
    """Engine(compile="regional"), the GPU default: compiled double-stream blocks with SP over groups of
    1 -> 2 -> 4 -> 1 ranks equal the eager single-rank run (fp32, <= 1e-5)."""
    from tests.multiproc.test_compile import _engine_compiled

    kwargs = {"width": 64, "height": 64, "guidance_scale": 4.0, "negative_prompt": "dark"}
    diff, groups, _ = run_ranks(_engine_compiled, 4, NAME, kwargs, timeout=900)[0]
    assert diff <= kTol, diff
    assert [len(g) for g in groups[1:5]] == [1, 2, 4, 1], groups
