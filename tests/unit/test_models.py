"""gfdit.models on one CPU process: presets, request validation, packed tokens, determinism, tiny requests
end to end, weights directories, and agreement with the diffusers pipelines."""

import json
import math
import shutil
import string
from dataclasses import replace

import pytest
import torch

from gfdit.models import PRESETS, get_preset, load_model
from gfdit.models.presets import MIN_DIFFUSERS_VERSION
from gfdit.request import Request

FLUX_REQ = dict(width=128, height=128, guidance_scale=3.5)  # 8x8 = 64 tokens
WAN_REQ = dict(width=64, height=64, num_frames=5, guidance_scale=5.0, negative_prompt="blurry, dark")  # 2x4x4


def _req(model, **kw):
    base = FLUX_REQ if model == "tiny-flux" else WAN_REQ
    args = {**base, "prompt": "a red fox in the snow", "num_inference_steps": 3, "seed": 11, **kw}
    return Request("t", model, **args)


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(name, device="cpu") for name in ("tiny-flux", "tiny-wan")}


# -- presets -----------------------------------------------------------------------------------------------


def test_preset_names_and_unknown_name():
    names = {
        "tiny-flux",
        "tiny-wan",
        "tiny-qwen-image",
        "tiny-wan2.2",
        "tiny-wan2.2-ti2v",
        "flux-dev",
        "wan2.1-1.3b",
        "wan2.1-14b",
        "qwen-image",
        "wan2.2-t2v-a14b",
        "wan2.2-ti2v-5b",
    }
    assert set(PRESETS) == names
    with pytest.raises(ValueError, match="known: " + ", ".join(sorted(names)).replace(".", r"\.")):
        get_preset("sdxl")
    with pytest.raises(ValueError):
        load_model("nope", device="cpu")


def test_min_diffusers_version_is_met():
    import diffusers
    from packaging.version import Version

    assert Version(diffusers.__version__) >= Version(MIN_DIFFUSERS_VERSION)


def test_tiny_presets_load_fully(tiny):
    for m in tiny.values():
        assert m.components == ("text", "transformer", "vae")
        assert m.dtype == torch.float32 and m.device == torch.device("cpu")
        assert m.num_heads == 4 and m.token_dim == 64
        assert all(not p.requires_grad for p in m.transformer.parameters())
        assert not m.transformer.training
    assert type(tiny["tiny-flux"].transformer).__name__ == "FluxTransformer2DModel"
    assert type(tiny["tiny-wan"].transformer).__name__ == "WanTransformer3DModel"
    assert type(tiny["tiny-wan"].vae).__name__ == "AutoencoderKLWan"


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, transformer, encoders",
    [
        # FLUX.1-dev: 11.9 B transformer; CLIP-L text 123 M; T5-XXL encoder 4.76 B.
        (
            "flux-dev",
            (11.85e9, 11.95e9),
            {"text_encoder": (0.12e9, 0.13e9), "text_encoder_2": (4.7e9, 4.8e9)},
        ),
        # Wan2.1: 1.3 B / 14 B transformers; UMT5-XXL encoder 5.7 B.
        ("wan2.1-1.3b", (1.3e9, 1.5e9), {"text_encoder": (5.6e9, 5.8e9)}),
        ("wan2.1-14b", (13.5e9, 14.5e9), {"text_encoder": (5.6e9, 5.8e9)}),
    ],
)
def test_full_size_presets_on_meta(name, transformer, encoders):
    m = load_model(name, device="meta")
    p = m.preset
    assert m.dtype == torch.bfloat16 and p.default_dtype == "bfloat16"
    assert transformer[0] < _count(m.transformer) < transformer[1]
    for folder, (lo, hi) in encoders.items():
        assert lo < _count(m.text_encoders[folder]) < hi, folder
    assert all(t.device.type == "meta" for t in m.transformer.parameters())
    cfg = m.transformer.config
    if name == "flux-dev":
        assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (
            19, 38, 24, 128,
        )  # fmt: skip
        assert cfg.joint_attention_dim == 4096 and cfg.pooled_projection_dim == 768 and cfg.guidance_embeds
        assert m.vae.config.latent_channels == 16 and m.vae.dtype == torch.bfloat16
    else:
        heads, layers, ffn = (12, 30, 8960) if name == "wan2.1-1.3b" else (40, 40, 13824)
        assert (cfg.num_attention_heads, cfg.num_layers, cfg.ffn_dim) == (heads, layers, ffn)
        assert tuple(cfg.patch_size) == (1, 2, 2) and cfg.qk_norm == "rms_norm_across_heads"
        assert cfg.cross_attn_norm and cfg.text_dim == 4096
        assert m.vae.dtype == torch.float32  # as WanPipeline's examples load the VAE
        # diffusers keeps these in fp32 when loading bf16 weights; random init does the same.
        assert m.transformer.blocks[0].scale_shift_table.dtype == torch.float32
        assert m.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert m.num_heads == p.num_heads and m.token_dim == 64


def test_components_subset_and_missing_component(tiny):
    m = load_model("tiny-flux", device="cpu", components=("transformer",))
    assert m.components == ("transformer",)
    req = _req("tiny-flux")
    m.validate(req)  # tokenizers are always there
    with pytest.raises(RuntimeError, match="'text'"):
        m.encode(req)
    with pytest.raises(RuntimeError, match="'vae'"):
        m.decode(m.init_latents(req), req)
    # The transformer alone is initialised exactly as in a full load.
    full = tiny["tiny-flux"]
    assert m.weights_fingerprint()["transformer"] == full.weights_fingerprint()["transformer"]
    with pytest.raises(ValueError, match="unknown components"):
        load_model("tiny-flux", device="cpu", components=("unet",))


# -- validation --------------------------------------------------------------------------------------------


def _bad(req, **fields):
    for k, v in fields.items():
        object.__setattr__(req, k, v)  # bypass Request's own checks to reach the model's
    return req


@pytest.mark.parametrize(
    "model, change, field",
    [
        ("tiny-flux", dict(width=120), "width"),  # not a multiple of 16
        ("tiny-flux", dict(height=40), "height"),
        ("tiny-flux", dict(width=512), "width"),  # above the preset's maximum
        ("tiny-flux", dict(height=16), "height"),  # below the minimum
        ("tiny-flux", dict(num_frames=5), "num_frames"),  # frames for an image model
        ("tiny-flux", dict(guidance_scale=-1.0), "guidance_scale"),
        ("tiny-flux", dict(prompt="word " * 80), "prompt"),  # T5 limit of tiny-flux: 64 tokens
        ("tiny-flux", dict(model="tiny-wan"), "model"),
        ("tiny-wan", dict(num_frames=None), "num_frames"),  # video needs frames
        ("tiny-wan", dict(num_frames=6), "num_frames"),  # not 4k+1
        ("tiny-wan", dict(num_frames=21), "num_frames"),  # above max frames
        ("tiny-wan", dict(prompt="word " * 40), "prompt"),  # UMT5 limit of tiny-wan: 32 tokens
        ("tiny-wan", dict(negative_prompt="bad " * 40), "negative_prompt"),
    ],
)
def test_validate_names_the_bad_field(tiny, model, change, field):
    tiny[model].validate(_req(model))  # the base request is fine
    with pytest.raises(ValueError, match=field):
        tiny[model].validate(replace(_req(model), **change))


@pytest.mark.parametrize("steps", [0, -3])
def test_validate_steps(tiny, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny["tiny-flux"].validate(_bad(_req("tiny-flux"), num_inference_steps=steps))


def test_full_size_limits():
    p = get_preset("flux-dev")
    assert (p.min_width, p.max_width, p.size_multiple) == (256, 2048, 16)
    w = get_preset("wan2.1-14b")
    assert (w.max_frames, w.frame_step, w.vae_temporal_factor, w.max_width) == (81, 4, 4, 1280)
    assert w.latent_frames(81) == 21 and w.token_grid(1280, 720, 81) == (21, 45, 80)


# -- shapes and packed tokens ------------------------------------------------------------------------------


def test_seq_len_and_sp_degrees(tiny):
    f, w = tiny["tiny-flux"], tiny["tiny-wan"]
    assert f.seq_len(_req("tiny-flux")) == 64 and f.token_grid(_req("tiny-flux")) == (1, 8, 8)
    assert f.seq_len(_req("tiny-flux", width=96, height=32)) == 12
    assert w.seq_len(_req("tiny-wan")) == 2 * 4 * 4
    assert f.valid_sp_degrees(_req("tiny-flux"), 8) == [1, 2, 4]  # 4 heads
    assert f.valid_sp_degrees(_req("tiny-flux", width=48, height=32), 4) == [1, 2]  # 6 tokens
    assert w.valid_sp_degrees(_req("tiny-wan", num_frames=1, width=48, height=48), 4) == [1]  # 9 tokens


def test_packed_tokens_round_trip_and_match_flux_pipeline(tiny):
    from diffusers import FluxPipeline

    for name, m in tiny.items():
        req = _req(name)
        lat = torch.randn(m.latent_shape(req), generator=torch.Generator().manual_seed(0))
        tok = m.pack_latents(lat)
        assert tok.shape == (1, m.seq_len(req), m.token_dim)
        assert torch.equal(m.unpack_latents(tok, req), lat)
    m, req = tiny["tiny-flux"], _req("tiny-flux", width=96, height=64)
    lat = torch.randn(m.latent_shape(req))
    assert torch.equal(m.pack_latents(lat), FluxPipeline._pack_latents(lat, 1, 16, 8, 12))
    want = FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    assert torch.equal(m.image_ids(req), want)


def test_wan_packed_forward_matches_diffusers_forward(tiny):
    """The packed-token Wan forward (Linear patch embedding, mirrored blocks) equals
    WanTransformer3DModel.forward on the unpacked latent."""
    from gfdit.models.sp import wan_forward

    m = tiny["tiny-wan"]
    req = _req("tiny-wan", width=96, height=64, num_frames=9)
    lat = torch.randn(2, *m.latent_shape(req)[1:], generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999.0, 500.0])
    with torch.no_grad():
        ref = m.transformer(hidden_states=lat, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        out = wan_forward(m.transformer, m.pack_latents(lat), t, ctx, m.token_grid(req))
    assert (out - m.pack_latents(ref)).abs().max().item() <= 1e-5


# -- determinism -------------------------------------------------------------------------------------------


def test_encode_and_init_latents_are_deterministic(tiny):
    for name, m in tiny.items():
        other = load_model(name, device="cpu")  # another "rank" builds its own copy
        assert other.weights_fingerprint() == m.weights_fingerprint()
        req = _req(name)
        a, b = m.encode(req), other.encode(req)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(m.init_latents(req), other.init_latents(req))
        assert not torch.equal(m.init_latents(req), m.init_latents(replace(req, seed=12)))
        assert not torch.equal(
            a["prompt_embeds"], m.encode(replace(req, prompt="a blue whale"))["prompt_embeds"]
        )
        assert m.init_latents(req).dtype == torch.float32
    with pytest.raises(ValueError, match="seed"):
        tiny["tiny-flux"].init_latents(_req("tiny-flux", seed=None))


def test_encode_outputs(tiny):
    f = tiny["tiny-flux"].encode(_req("tiny-flux"))
    assert f["prompt_embeds"].shape == (1, 64, 32) and f["pooled_prompt_embeds"].shape == (1, 32)
    w = tiny["tiny-wan"].encode(_req("tiny-wan"))
    assert set(w) == {"prompt_embeds", "negative_prompt_embeds"} and w["prompt_embeds"].shape == (1, 32, 32)
    n = len("a red fox in the snow".split()) + 1  # words + eos
    assert w["prompt_embeds"][0, n:].abs().max() == 0 and w["prompt_embeds"][0, :n].abs().min() > 0
    assert "negative_prompt_embeds" not in tiny["tiny-wan"].encode(_req("tiny-wan", guidance_scale=1.0))


def test_timesteps(tiny):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = tiny["tiny-flux"].timesteps(_req("tiny-flux", num_inference_steps=5))
    assert len(s.timesteps) == 5 and len(s.sigmas) == 6 and s.sigmas[-1] == 0
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    want = math.exp(mu) / (math.exp(mu) + (1 / 1.0 - 1) ** 1.0)  # time_shift of sigma = 1
    assert abs(s.sigmas[0].item() - want) < 1e-6
    w = tiny["tiny-wan"]
    assert w.flow_shift(_req("tiny-wan")) == 3.0
    assert w.flow_shift(replace(_req("tiny-wan"), model="x", width=1280, height=720)) == 5.0


# -- end to end on one rank --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("tiny-flux", (1, 128, 128, 3)), ("tiny-wan", (1, 5, 64, 64, 3))])
def test_request_end_to_end_on_one_rank(tiny, name, shape):
    m = tiny[name]
    req = _req(name)
    m.validate(req)
    cond = m.encode(req)
    x = m.init_latents(req)
    s = m.seq_len(req)
    y = m.denoise(x, (0, s), cond, 0, req.num_inference_steps, req)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not torch.equal(x, y)
    # Chunks on one rank compose: [0, 1) then [1, 3) is [0, 3).
    y2 = m.denoise(m.denoise(x, (0, s), cond, 0, 1, req), (0, s), cond, 1, 3, req)
    assert torch.equal(y, y2)
    out = m.decode(y, req)
    assert out.shape == shape and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert out.float().std() > 0


def test_denoise_argument_checks(tiny):
    m = tiny["tiny-flux"]
    req = _req("tiny-flux")
    cond, x = m.encode(req), m.init_latents(req)
    with pytest.raises(ValueError, match="tokens"):
        m.denoise(x[:, :32], (0, 32), cond, 0, 1, req)  # alone, a rank must hold all 64 tokens
    with pytest.raises(ValueError, match="start"):
        m.denoise(x, (0, 64), cond, 2, 5, req)
    with pytest.raises(ValueError, match="cond lacks"):
        m.denoise(x, (0, 64), {}, 0, 1, req)


# -- weights directories -----------------------------------------------------------------------------------


def _has_accelerate():
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


# diffusers loads WanTransformer3DModel (it has _keep_in_fp32_modules) from a directory only with accelerate.
needs_accelerate = pytest.mark.skipif(not _has_accelerate(), reason="loading Wan weights needs accelerate")


@pytest.mark.parametrize("name", ["tiny-flux", pytest.param("tiny-wan", marks=needs_accelerate)])
def test_weights_dir_round_trip(tiny, tmp_path, name):
    m = tiny[name]
    d = tmp_path / name
    m.save_pretrained(d)
    for sub in ["transformer", "vae"] + [e.subfolder for e in m.preset.text_encoders]:
        assert (d / sub / "config.json").is_file(), sub
    back = load_model(name, device="cpu", weights=d)
    assert back.weights_fingerprint() == m.weights_fingerprint()
    req = _req(name, num_inference_steps=2)
    cond = back.encode(req)
    assert all(torch.equal(cond[k], v) for k, v in m.encode(req).items())
    s = m.seq_len(req)
    y = back.denoise(back.init_latents(req), (0, s), cond, 0, 2, req)
    assert torch.equal(y, m.denoise(m.init_latents(req), (0, s), cond, 0, 2, req))
    assert torch.equal(back.decode(y, req), m.decode(y, req))
    with pytest.raises(FileNotFoundError):
        load_model("tiny-flux", device="cpu", weights=tmp_path / "missing")


@needs_accelerate
def test_wan22_weights_dir_without_transformer_2_names_it(tmp_path):
    d = tmp_path / "wan22"
    load_model("tiny-wan2.2", device="cpu").save_pretrained(d)
    shutil.rmtree(d / "transformer_2")
    # Only transformer_2/ is named: everything else is there.
    with pytest.raises(
        FileNotFoundError, match=r"lacks transformer_2/ \(the low-noise expert\) \(model 'tiny-wan2.2'"
    ):
        load_model("tiny-wan2.2", device="cpu", weights=d)
    # Without the transformers, the rest still loads.
    m = load_model("tiny-wan2.2", device="cpu", weights=d, components=("text", "vae"))
    assert m.components == ("text", "vae") and m.transformer_2 is None


@needs_accelerate
def test_video_weights_dirs_of_another_layout_are_refused(tmp_path):
    two, ti2v = tmp_path / "two", tmp_path / "ti2v"
    load_model("tiny-wan2.2", device="cpu", components=("transformer",)).save_pretrained(two)
    load_model("tiny-wan2.2-ti2v", device="cpu", components=("transformer", "vae")).save_pretrained(ti2v)
    # Two experts under a one-transformer preset: transformer_2/ would be silently left out.
    for name in ("tiny-wan", "tiny-wan2.2-ti2v"):
        with pytest.raises(ValueError, match=f"holds two experts .*'tiny-wan2.2'.*model '{name}' has one"):
            load_model(name, device="cpu", weights=two, components=("transformer",))
    # The 48-channel TI2V layout under Wan 2.1's 16 channels: named key by key.
    with pytest.raises(
        ValueError, match="transformer/config.json has in_channels=48, the preset 16;.*z_dim=48"
    ):
        load_model("tiny-wan", device="cpu", weights=ti2v, components=("transformer", "vae"))
    index = json.loads((two / "model_index.json").read_text())
    index["boundary_ratio"] = 0.9
    (two / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="boundary_ratio 0.9 .*'tiny-wan2.2' switches experts at 0.875"):
        load_model("tiny-wan2.2", device="cpu", weights=two, components=("transformer",))


def _clip_tokenizer(max_length):
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({f"<filler{i}>": i for i in range(52, 998)})
    vocab.update({"<|startoftext|>": 998, "<|endoftext|>": 999})  # as the tiny CLIP config's bos / eos
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _with_real_tokenizers(model, directory):
    """`model` saved to `directory` with real transformers tokenizers, loaded back from there."""
    model.save_pretrained(directory)
    for spec in model.preset.text_encoders:
        tok = _clip_tokenizer(spec.max_length) if spec.token_style == "clip" else _t5_tokenizer()
        target = directory / spec.tokenizer_subfolder
        for f in target.iterdir():
            f.unlink()
        tok.save_pretrained(target)
    return load_model(model.preset.name, device="cpu", weights=directory)


def test_real_tokenizers_from_weights_dir(tiny, tmp_path):
    from gfdit.models.tokenizer import HFTokenizer

    m = _with_real_tokenizers(tiny["tiny-flux"], tmp_path / "flux")
    assert all(isinstance(t, HFTokenizer) for t in m.tokenizers.values())
    assert type(m.tokenizers["text_encoder"].tokenizer).__name__ == "CLIPTokenizer"
    t5 = m.tokenizers["text_encoder_2"]
    ids, mask = t5.encode(["a cat"], 8)
    assert ids.shape == mask.shape == (1, 8) and ids[0, -1] == 0 and int(mask.sum()) == t5.count("a cat")
    with pytest.raises(ValueError, match="prompt"):
        m.validate(_req("tiny-flux", prompt="abcdefghij " * 8))  # > 64 sentencepiece tokens
    assert m.encode(_req("tiny-flux"))["prompt_embeds"].shape == (1, 64, 32)


def test_flux_matches_diffusers_pipeline(tiny, tmp_path):
    """Our encode / init_latents / timesteps / denoise / decode reproduce FluxPipeline on the same modules."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    m = _with_real_tokenizers(tiny["tiny-flux"], tmp_path / "flux")
    req = _req("tiny-flux", num_inference_steps=3)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**dict(m.preset.scheduler_config)),
        vae=m.vae,
        text_encoder=m.text_encoders["text_encoder"],
        tokenizer=m.tokenizers["text_encoder"].tokenizer,
        text_encoder_2=m.text_encoders["text_encoder_2"],
        tokenizer_2=m.tokenizers["text_encoder_2"].tokenizer,
        transformer=m.transformer,
    )
    kw = dict(
        prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=3,
        guidance_scale=req.guidance_scale, max_sequence_length=64,
    )  # fmt: skip
    want = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="latent").images
    s = m.seq_len(req)
    y = m.denoise(m.init_latents(req), (0, s), m.encode(req), 0, 3, req)
    assert (y - want).abs().max().item() <= 1e-5
    img = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="np").images
    ref = torch.from_numpy((img * 255).round().astype(np.uint8))
    assert (m.decode(y, req).int() - ref.int()).abs().max() <= 1


@needs_accelerate
def test_wan_matches_diffusers_pipeline(tiny, tmp_path):
    """Same for WanPipeline (with its scheduler set to our FlowMatch Euler): CFG, negative prompt, VAE."""
    import numpy as np
    from diffusers import WanPipeline

    m = _with_real_tokenizers(tiny["tiny-wan"], tmp_path / "wan")
    req = _req("tiny-wan", prompt="a cat sat", negative_prompt="dark", num_inference_steps=3)
    pipe = WanPipeline(
        tokenizer=m.tokenizers["text_encoder"].tokenizer,
        text_encoder=m.text_encoders["text_encoder"],
        vae=m.vae,
        scheduler=m.timesteps(req),
        transformer=m.transformer,
    )
    kw = dict(
        prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height, width=req.width,
        num_frames=req.num_frames, num_inference_steps=3, guidance_scale=req.guidance_scale,
        max_sequence_length=32,
    )  # fmt: skip
    want = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="latent").frames
    s = m.seq_len(req)
    y = m.denoise(m.init_latents(req), (0, s), m.encode(req), 0, 3, req)
    assert (y - m.pack_latents(want)).abs().max().item() <= 1e-5
    video = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="np").frames
    ref = torch.from_numpy((np.asarray(video) * 255).round().astype(np.uint8))
    assert (m.decode(y, req).int() - ref.int()).abs().max() <= 1


def test_flux_shift_matches_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from gfdit.models.flux import flux_shift

    for seq in (16, 256, 1024, 4096, 16384):
        args = (seq, 256, 4096, 0.5, 1.15)
        assert flux_shift(*args) == pytest.approx(calculate_shift(*args), rel=1e-12, abs=1e-12)


def test_loading_a_model_warns_of_nothing_it_does_not_use():
    import subprocess
    import sys

    names = ("tiny-flux", "tiny-wan", "tiny-qwen-image", "tiny-wan2.2", "tiny-wan2.2-ti2v")
    code = f"from gfdit.models import load_model\nfor n in {names!r}: load_model(n, device='cpu')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr, out.stderr
