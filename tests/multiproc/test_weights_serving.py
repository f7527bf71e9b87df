"""Serving real weights from a local directory, end to end: a tiny pipeline of each image family is
saved with save_pretrained (tokenizers included) after its weights were changed, a 2-rank server is
started on it with `gfdit serve --weights DIR`, and the image it returns over HTTP equals the same
request computed in this process from the saved directory — and differs from the preset's own random
weights, so the directory was really used. Nothing is downloaded. Bad directories get errors that
name what is missing."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
import torch

from tests.multiproc.test_server import _healthy, _png, _start, kStartTimeoutS

kFamilies = ["tiny-flux", "tiny-qwen-image"]


def _save_changed(preset: str, directory: str) -> None:
    from gfdit.models import load_model

    model = load_model(preset, device="cpu")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # other weights than the preset's seeded random init
        for module in (model.transformer, model.vae):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.save_pretrained(directory)


def _local_image(preset: str, directory: str, body: dict) -> np.ndarray:
    """The request computed on one rank in this process, from the directory."""
    from gfdit.models import load_model
    from gfdit.request import Request

    model = load_model(preset, device="cpu", weights=directory)
    w, h = (int(v) for v in body["size"].split("x"))
    req = Request("local", preset, body["prompt"], width=w, height=h,
                  num_inference_steps=body["num_inference_steps"], seed=body["seed"])  # fmt: skip
    model.validate(req)
    cond = model.encode(req)
    x = model.init_latents(req)
    x = model.denoise(x, (0, x.shape[1]), cond, 0, req.num_inference_steps, req)
    return model.decode(x, req)[0].numpy()


@pytest.mark.parametrize("preset", kFamilies)
def test_server_serves_a_saved_directory(preset, tmp_path):
    directory = str(tmp_path / "weights")
    _save_changed(preset, directory)
    assert os.path.isdir(os.path.join(directory, "tokenizer")) or any(
        name.startswith("tokenizer") for name in os.listdir(directory)
    ), os.listdir(directory)
    body = dict(
        prompt="a lighthouse at dusk", size="64x64", num_inference_steps=3, seed=7, response_format="b64_json"
    )
    want = _local_image(preset, directory, body)
    default = None
    for weights in (directory, None):
        config = (preset, "fcfs-elastic", [] if weights is None else ["--weights", weights])
        name = "preset" if weights is None else "weights"
        server = _start(name, str(tmp_path), config)
        try:
            server = _healthy(server, str(tmp_path), time.monotonic() + kStartTimeoutS, config)
            r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=180)
            assert r.status_code == 200, r.text
            got = _png(r.json()["data"][0]["b64_json"])
        finally:
            server.stop()
        if weights is None:
            default = got
        else:
            assert got.shape == want.shape, (got.shape, want.shape)
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.mean() <= 2.0 and diff.max() <= 8, (diff.mean(), diff.max())
    # The preset's own random weights give another image: the directory's weights were used.
    assert np.abs(default.astype(int) - want.astype(int)).mean() > 5


def test_bad_weight_directories_name_what_is_wrong(tmp_path):
    from gfdit.models import load_model

    directory = str(tmp_path / "weights")
    _save_changed("tiny-flux", directory)
    shutil.rmtree(os.path.join(directory, "vae"))
    with pytest.raises(FileNotFoundError, match="lacks vae/"):
        load_model("tiny-flux", device="cpu", weights=directory)
    load_model(
        "tiny-flux", device="cpu", weights=directory, components=("text", "transformer")
    )  # no VAE needed
    # A directory of another model family.
    other = str(tmp_path / "qwen")
    _save_changed("tiny-qwen-image", other)
    with open(os.path.join(other, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "QwenImagePipeline"
    with pytest.raises(
        ValueError, match="holds a QwenImagePipeline .*'tiny-qwen-image'.* needs a FluxPipeline"
    ):
        load_model("tiny-flux", device="cpu", weights=other)
