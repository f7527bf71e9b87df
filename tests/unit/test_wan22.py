"""Wan2.2 on one CPU process: tiny-wan2.2 (two experts: which one runs at every step, whatever the chunks),
tiny-wan2.2-ti2v (the 48-channel, 16x VAE of TI2V-5B: shapes and a round trip), agreement with diffusers'
WanPipeline given boundary_ratio / expand_timesteps, weights directories with transformer_2/, and the
full-size configurations on the meta device."""

import pytest
import torch

from gfdit.models import PRESETS, load_model
from gfdit.models.wan22 import kHighNoise, kLowNoise
from gfdit.request import Request

TWO = "tiny-wan2.2"
TI2V = "tiny-wan2.2-ti2v"


def _req(name, **kw):
    args = dict(prompt="a red fox in the snow", width=64, height=64, num_frames=9, num_inference_steps=4,
                seed=3, guidance_scale=4.0, negative_prompt="blurry")  # fmt: skip
    return Request("w", name, **{**args, **kw})


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(name, device="cpu") for name in (TWO, TI2V)}


class _ExpertLog:
    """Which expert ran: a hook on each transformer's condition embedder (called once per forward)."""

    def __init__(self, model):
        self.calls = []
        self.handles = []
        for name, module in ((kHighNoise, model.transformer), (kLowNoise, model.transformer_2)):
            if module is not None:
                hook = module.condition_embedder.register_forward_hook(
                    lambda mod, args, out, name=name: self.calls.append((name, float(args[0][0])))
                )
                self.handles.append(hook)

    def close(self):
        for h in self.handles:
            h.remove()


def test_presets():
    assert {TWO, TI2V, "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"} <= set(PRESETS)
    two, ti2v = PRESETS[TWO], PRESETS[TI2V]
    assert two.family == ti2v.family == "wan2.2"
    assert two.boundary_ratio == 0.875 and two.transformer_2_config is not None
    assert ti2v.boundary_ratio is None and ti2v.transformer_2_config is None
    assert (ti2v.latent_channels, ti2v.vae_scale_factor, ti2v.size_multiple, ti2v.token_dim) == (
        48,
        16,
        32,
        192,
    )


def test_expert_switch_at_the_boundary_timestep_whatever_the_chunks(tiny):
    m = tiny[TWO]
    req = _req(TWO)
    ts = [float(t) for t in m.timesteps(req).timesteps]
    boundary = 0.875 * 1000
    want = [kHighNoise if t >= boundary else kLowNoise for t in ts]
    assert m.experts(req) == want
    assert want[0] == kHighNoise and want[-1] == kLowNoise  # the switch falls inside the request
    k = want.index(kLowNoise)
    assert 1 < k < 4  # steps 0..k-1 high noise, k.. low noise (k = 2 at 4 steps, shift 12)
    cond, x0, s = m.encode(req), m.init_latents(req), m.seq_len(req)
    log = _ExpertLog(m)
    try:
        ref = m.denoise(x0, (0, s), cond, 0, 4, req)
        assert log.calls == [
            (e, t) for e, t in zip(want, ts, strict=True)
        ]  # a forward per step (CFG: batch 2)
        for chunks in ([(0, 1), (1, 3), (3, 4)], [(0, k), (k, 4)], [(0, 4)], [(0, 2), (2, 2), (2, 4)]):
            log.calls.clear()
            x = x0
            for a, b in chunks:  # a chunk straddling the switch, ending on it, starting on it, empty
                x = m.denoise(x, (0, s), cond, a, b, req)
            assert torch.equal(x, ref), chunks
            assert [c[0] for c in log.calls] == want, chunks
    finally:
        log.close()
    # Each expert really is a different network: swapping them changes the result.
    m.transformer, m.transformer_2 = m.transformer_2, m.transformer
    try:
        assert not torch.equal(m.denoise(x0, (0, s), cond, 0, 4, req), ref)
    finally:
        m.transformer, m.transformer_2 = m.transformer_2, m.transformer


@pytest.mark.parametrize("name", [TWO, TI2V])
def test_matches_the_wan_pipeline(tiny, name):
    """WanPipeline with transformer_2 + boundary_ratio (A14B layout) or expand_timesteps (TI2V-5B), its
    scheduler set to ours, given our text embeddings: the same latent and video."""
    import numpy as np
    from diffusers import WanPipeline

    m = tiny[name]
    req = _req(name, width=64 if name == TWO else 128, height=64 if name == TWO else 96)
    cond = m.encode(req)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=m.text_encoders["text_encoder"],
        vae=m.vae,
        scheduler=m.timesteps(req),
        transformer=m.transformer,
        transformer_2=m.transformer_2,
        boundary_ratio=m.preset.boundary_ratio,
        expand_timesteps=name == TI2V,
    )
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
        height=req.height, width=req.width, num_frames=req.num_frames, num_inference_steps=4,
        guidance_scale=req.guidance_scale,
    )  # fmt: skip
    want = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="latent").frames
    s = m.seq_len(req)
    y = m.denoise(m.init_latents(req), (0, s), cond, 0, 4, req)
    assert (y - m.pack_latents(want)).abs().max().item() <= 1e-5
    video = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="np").frames
    ref = torch.from_numpy((np.asarray(video) * 255).round().astype(np.uint8))
    got = m.decode(y, req)
    assert got.shape == (1, 9, req.height, req.width, 3)
    assert (got.int() - ref.int()).abs().max() <= 1


def test_high_compression_vae_round_trip(tiny):
    """tiny-wan2.2-ti2v: 16x spatial / 4x temporal, 48 channels; 32-pixel multiples (16x VAE x 2x2 patches).
    A video encodes to the latent shape the model packs, and decodes back to the video's shape."""
    m = tiny[TI2V]
    req = _req(TI2V, width=128, height=96, num_frames=9)
    assert m.latent_shape(req) == (1, 48, 3, 6, 8) and m.token_grid(req) == (3, 3, 4)
    video = torch.rand(1, 3, 9, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        lat = m.vae.encode(video).latent_dist.mode()
        assert tuple(lat.shape) == m.latent_shape(req)
        assert torch.equal(m.unpack_latents(m.pack_latents(lat), req), lat)
        back = m.vae.decode(lat, return_dict=False)[0]
    assert back.shape == video.shape and torch.isfinite(back).all()
    frames = m.decode(m.pack_latents(lat), req)
    assert frames.shape == (1, 9, 96, 128, 3) and frames.dtype == torch.uint8
    with pytest.raises(ValueError, match="multiple of 32"):
        m.validate(_req(TI2V, width=80))


@pytest.mark.parametrize("name", [TWO, TI2V])
def test_weights_dir_round_trip(tiny, tmp_path, name):
    import json

    m = tiny[name]
    m.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["boundary_ratio"] == m.preset.boundary_ratio
    assert (tmp_path / "transformer_2" / "config.json").is_file() == (name == TWO)
    back = load_model(name, device="cpu", weights=tmp_path)
    assert back.weights_fingerprint() == m.weights_fingerprint()
    assert (kLowNoise in back.weights_fingerprint()) == (name == TWO)
    req = _req(name, num_inference_steps=3)
    cond, s = m.encode(req), m.seq_len(req)
    y = back.denoise(back.init_latents(req), (0, s), cond, 0, 3, req)
    assert torch.equal(y, m.denoise(m.init_latents(req), (0, s), cond, 0, 3, req))


@pytest.mark.parametrize(
    "name, experts, vae_channels, params",
    [("wan2.2-t2v-a14b", 2, 16, (14.0e9, 14.5e9)), ("wan2.2-ti2v-5b", 1, 48, (4.9e9, 5.1e9))],
)
def test_full_size_configs_on_meta(name, experts, vae_channels, params):
    m = load_model(name, device="meta")
    assert m.dtype == torch.bfloat16 and m.vae.dtype == torch.float32
    mods = [t for t in (m.transformer, m.transformer_2) if t is not None]
    assert len(mods) == experts
    for t in mods:
        assert params[0] < sum(p.numel() for p in t.parameters()) < params[1]
        assert all(p.device.type == "meta" for p in t.parameters())
    cfg = m.transformer.config
    if name == "wan2.2-t2v-a14b":
        assert (cfg.num_attention_heads, cfg.num_layers, cfg.ffn_dim, cfg.in_channels) == (40, 40, 13824, 16)
        assert m.preset.boundary_ratio == 0.875 and m.preset.scheduler_config["shift"] == 12.0
        assert m.preset.default_steps == 40 and m.preset.max_frames == 81
    else:
        assert (cfg.num_attention_heads, cfg.num_layers, cfg.ffn_dim, cfg.in_channels) == (24, 30, 14336, 48)
        vae = m.vae.config
        assert (vae.z_dim, vae.patch_size, vae.scale_factor_spatial, vae.is_residual) == (48, 2, 16, True)
        assert (vae.base_dim, vae.decoder_base_dim) == (160, 256)
        assert m.preset.scheduler_config["shift"] == 5.0 and m.preset.max_frames == 121
        m.validate(Request("v", name, "a fox", width=1280, height=704, num_frames=121))  # 720p of TI2V-5B
    assert m.vae.config.z_dim == vae_channels == m.preset.latent_channels
    assert m.text_encoders["text_encoder"].config.d_model == 4096


def test_batched_denoising_is_refused_with_the_reason():
    import pytest

    from gfdit.models import load_model
    from gfdit.models.batch import BatchItem
    from gfdit.request import Request

    model = load_model("tiny-wan2.2", device="cpu", components=("transformer",))
    req = Request("b", "tiny-wan2.2", "x", num_inference_steps=4, seed=1)
    x = model.init_latents(req)
    items = [
        BatchItem(req, x, {}, 0, 1),
        BatchItem(Request("c", "tiny-wan2.2", "y", num_inference_steps=4, seed=2), x, {}, 0, 1),
    ]
    with pytest.raises(NotImplementedError, match="expert"):
        model.denoise_batch(items, (0, x.shape[1]))
