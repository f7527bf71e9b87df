"""Serving real weights from a local directory, end to end: a tiny pipeline of each family is saved
with save_pretrained (tokenizers included) after its weights were changed, a 2-rank server is started
on it with `gfdit serve --weights DIR`, and the image or video it returns over HTTP equals the same
request computed in this process from the saved directory — and differs from the preset's own random
weights, so the directory was really used. Nothing is downloaded. Bad directories get errors that
name what is missing."""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
import torch

from tests.multiproc.test_server import _healthy, _png, _start, _video_end, kStartTimeoutS

kFamilies = ["tiny-flux", "tiny-qwen-image"]
# Wan 2.1; Wan2.2 with two experts (transformer/ and transformer_2/); Wan2.2 TI2V's 48-channel VAE with
# 16x compression (sizes multiples of 32).
kVideoFamilies = {"tiny-wan": "64x48", "tiny-wan2.2": "64x48", "tiny-wan2.2-ti2v": "64x64"}


def _save_changed(preset: str, directory: str) -> None:
    from gfdit.models import load_model

    model = load_model(preset, device="cpu")
    gen = torch.Generator().manual_seed(5)
    modules = [model.transformer, model.vae]
    if getattr(model, "transformer_2", None) is not None:  # Wan2.2's low-noise expert
        modules.append(model.transformer_2)
    with torch.no_grad():  # other weights than the preset's seeded random init
        for module in modules:
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
    return _run_alone(model, req)


def _run_alone(model, req) -> np.ndarray:
    """`req` encoded, denoised and decoded by `model` on this one rank: its first output."""
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


def _local_video(model, body: dict) -> np.ndarray:
    """The video request computed on one rank in this process: uint8 [F, H, W, 3]."""
    from gfdit.request import Request

    w, h = _size(body)
    req = Request("local", model.preset.name, body["prompt"], negative_prompt=body["negative_prompt"],
                  width=w, height=h, num_frames=body["num_frames"], guidance_scale=body["guidance_scale"],
                  num_inference_steps=body["num_inference_steps"], seed=body["seed"])  # fmt: skip
    return _run_alone(model, req)


def _mp4_frames(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


# The server returns a video only as an mp4 (H.264 at crf 18, lossy), so its frames are compared after
# decoding, with the local frames put through the same encoder (gfdit.server.media.mp4_bytes). Measured
# (mean |difference| of decoded uint8 frames, 5 frames, 3-4 steps, on 2 CPU cores): 0 when the encoder
# repeats itself, up to 2.7 when it does not (libx264 gave two different streams for the same frames on
# a loaded machine); the raw frames against their own mp4, 10.6 (64x48 Wan) and 35.6 (64x64 TI2V: its
# random 16x VAE makes pixel noise); the preset's random weights instead of the directory's, 33.6-42.1;
# one Wan2.2 expert of the preset and one of the directory: transformer/ 15.3 at 3 steps (two of them on
# it) and 5.5 at 4, transformer_2/ 13.9 at 4 steps (two on each expert) and 5.5 at 3.
kVideoTolerance = 6.0  # mean |difference| of the decoded mp4s for "the same video"
kVideoChanged = 10.0  # a change of weights the test relies on moves the decoded mp4 more than this


def _decoded_mp4(frames: np.ndarray, fps: int) -> np.ndarray:
    from gfdit.server.media import mp4_bytes

    return _mp4_frames(mp4_bytes(frames, fps))


@pytest.mark.parametrize("preset", list(kVideoFamilies))
def test_server_serves_a_saved_video_directory(preset, tmp_path):
    """POST /v1/videos on a 2-rank server of the saved directory (static SP 2: both ranks' weights
    count), polled until completed; the mp4 of GET /content against the same request computed here
    from the directory, and against the preset's own random weights. For Wan2.2 the requests take 3
    and 4 steps, so that each expert (transformer/ for the early steps, transformer_2/ after the
    boundary) moves one of them beyond the tolerance: the server must have loaded both."""
    from gfdit.models import load_model

    directory = str(tmp_path / "weights")
    _save_changed(preset, directory)
    parts = {"model_index.json", "text_encoder", "tokenizer", "transformer", "vae"}
    if preset == "tiny-wan2.2":
        parts.add("transformer_2")
    assert set(os.listdir(directory)) == parts, os.listdir(directory)
    model = load_model(preset, device="cpu", weights=directory)
    random_model = load_model(preset, device="cpu")
    experts = [name for name in ("transformer", "transformer_2") if getattr(model, name, None) is not None]
    assert experts == (["transformer", "transformer_2"] if preset == "tiny-wan2.2" else ["transformer"])
    bodies = [
        dict(prompt="waves at night", negative_prompt="blurry", size=kVideoFamilies[preset], num_frames=5,
             num_inference_steps=steps, guidance_scale=4.0, seed=7, fps=16)
        for steps in ((3, 4) if len(experts) == 2 else (3,))
    ]  # fmt: skip
    config = (preset, "static:sp=2", ["--weights", directory])
    server = _start("weights", str(tmp_path), config)
    got = []
    try:
        server = _healthy(server, str(tmp_path), time.monotonic() + kStartTimeoutS, config)
        for body in bodies:
            r = httpx.post(server.url + "/v1/videos", json=body, timeout=60)
            assert r.status_code == 200, r.text
            job = _video_end(server.url, r.json()["id"], 180)
            assert job["status"] == "completed", job
            assert [g["ranks"] for g in job["gfdit"]["groups"][0] if "denoise" in g["task"]] == [[0, 1]], job
            content = httpx.get(f"{server.url}/v1/videos/{job['id']}/content", timeout=30)
            assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
            got.append(_mp4_frames(content.content))
    finally:
        server.stop()
    moved = dict.fromkeys(experts, 0.0)  # per expert: how far its directory weights move the mp4
    for body, video in zip(bodies, got, strict=True):
        want = _local_video(model, body)
        assert video.shape == want.shape == (5, *reversed(_size(body)), 3), (video.shape, want.shape)
        coded = _decoded_mp4(want, body["fps"])
        assert _mean_abs(video, coded) <= kVideoTolerance, _mean_abs(video, coded)
        assert _mean_abs(video, want) <= _mean_abs(coded, want) + kVideoTolerance
        # The preset's own random weights give another video: the directory's weights were used.
        default = _decoded_mp4(_local_video(random_model, body), body["fps"])
        assert _mean_abs(video, default) > 2 * kVideoChanged, _mean_abs(video, default)
        for name in experts:
            mine = getattr(model, name)
            setattr(model, name, getattr(random_model, name))
            try:
                other = _decoded_mp4(_local_video(model, body), body["fps"])
            finally:
                setattr(model, name, mine)
            moved[name] = max(moved[name], _mean_abs(coded, other))
    assert all(v > kVideoChanged for v in moved.values()), moved


def _size(body: dict) -> tuple[int, int]:
    w, h = (int(v) for v in body["size"].split("x"))
    return w, h


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
