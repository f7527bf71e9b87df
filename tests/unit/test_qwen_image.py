"""Qwen-Image on one CPU process: the presets (tiny and the full-size configuration, the latter on the meta
device only), request limits, the SP degrees the planner may use, and agreement with diffusers'
QwenImagePipeline on the same modules (true CFG with true_cfg_scale and a negative prompt, the prompt
template, the scheduler, the VAE)."""

import pytest
import torch

from gfdit.models import PRESETS, load_model
from gfdit.request import Request

NAME = "tiny-qwen-image"
REQ = dict(width=128, height=128, guidance_scale=4.0, negative_prompt="blurry, dark")  # 8x8 = 64 tokens


def _req(**kw):
    args = {**REQ, "prompt": "a red fox in the snow", "num_inference_steps": 3, "seed": 11, **kw}
    return Request("q", NAME, **args)


@pytest.fixture(scope="module")
def tiny():
    return load_model(NAME, device="cpu")


def _bad(req, **fields):
    for k, v in fields.items():
        object.__setattr__(req, k, v)  # bypass Request's own checks to reach the model's
    return req


def test_tiny_preset_loads_and_limits(tiny):
    assert {"tiny-qwen-image", "qwen-image"} <= set(PRESETS)
    m = tiny
    assert m.components == ("text", "transformer", "vae")
    assert type(m.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(m.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(m.text_encoders["text_encoder"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert m.num_heads == 4 and m.token_dim == 64 and m.dtype == torch.float32
    for size in range(32, 257, 16):  # every multiple of 16 up to 256
        m.validate(_req(width=size, height=256 - size + 32))
    for change, field in [
        (dict(width=136), "width"),  # not a multiple of 16
        (dict(height=272), "height"),  # above 256
        (dict(width=16), "width"),  # below the minimum
        (dict(num_frames=5), "num_frames"),
        (dict(prompt="word " * 80), "prompt"),  # 64 tokens at most
        (dict(negative_prompt="word " * 80), "negative_prompt"),
    ]:
        with pytest.raises(ValueError, match=field):
            m.validate(_bad(_req(), **change))
    assert m.preset.default_size == (128, 128)  # what the server makes when a request names no size
    m.validate(_req(num_inference_steps=1))
    m.validate(_req(num_inference_steps=97))  # any step count


def test_full_size_config_matches_the_published_architecture():
    """qwen-image on the meta device (no memory): transformer 20.4 B parameters (60 double-stream blocks,
    24 heads x 128, text width 3584), Qwen2.5-VL-7B text encoder (8.3 B with its vision tower), 127 M VAE."""
    m = load_model("qwen-image", device="meta")
    assert m.dtype == torch.bfloat16 and m.preset.default_dtype == "bfloat16"
    cfg = m.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (60, 24, 128)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.joint_attention_dim) == (64, 16, 2, 3584)
    assert tuple(cfg.axes_dims_rope) == (16, 56, 56) and not cfg.guidance_embeds

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert 20.3e9 < count(m.transformer) < 20.5e9
    enc = m.text_encoders["text_encoder"]
    assert 8.2e9 < count(enc) < 8.35e9
    text = enc.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size) == (
        3584, 28, 28, 152064,
    )  # fmt: skip
    assert 0.12e9 < count(m.vae) < 0.13e9 and m.vae.config.z_dim == 16
    assert all(p.device.type == "meta" for p in m.transformer.parameters())
    p = m.preset
    assert p.sequence_encoder.max_length == 512 and p.default_steps == 50 and p.default_guidance == 4.0
    assert p.scheduler_config["max_image_seq_len"] == 8192 and p.scheduler_config["shift_terminal"] == 0.02


def test_sp_degrees_divide_heads_and_latent_tokens(tiny):
    """The planner's degrees (Scheduler(valid_degrees=model.valid_sp_degrees), as the engine builds it):
    text tokens are replicated and do not constrain the degree."""
    from gfdit.policy import Assignment, Policy
    from gfdit.scheduler import PolicyError, Scheduler

    m = tiny
    assert m.valid_sp_degrees(_req(), 8) == [1, 2, 4]  # 64 tokens, 4 heads
    assert m.valid_sp_degrees(_req(width=48, height=32), 4) == [1, 2]  # 3 x 2 = 6 tokens
    assert m.valid_sp_degrees(_req(width=48, height=48), 4) == [1]  # 9 tokens

    class Fixed(Policy):
        name = "fixed"

        def __init__(self, ranks):
            self.ranks = ranks

        def schedule(self, view):
            return [Assignment(rt.task, self.ranks, None) for rt in view.runnable]

    for req, ranks, ok in [
        (_req(width=48, height=48), (0, 1), False),
        (_req(), (0, 1, 2), False),
        (_req(), (0, 1, 2, 3), True),
    ]:
        sched = Scheduler(4, Fixed(ranks), valid_degrees=m.valid_sp_degrees, dim_size=m.seq_len)
        sched.submit(req)
        if ok:
            assert [a.ranks for a in sched.schedule(0.0)] == [ranks]
        else:
            with pytest.raises(PolicyError, match="not a valid degree"):
                sched.schedule(0.0)
    # denoise refuses a group it cannot split, naming the valid degrees.
    req = _req(width=48, height=48)

    class Three:
        size, rank = 3, 0

    with pytest.raises(ValueError, match=r"valid: \[1\]"):
        m.denoise(m.init_latents(req)[:, :3], (0, 3), m.encode(req), 0, 1, req, group=Three())


def test_encode_cfg_and_default_negative_prompt(tiny):
    m = tiny
    cond = m.encode(_req())
    assert set(cond) == {"prompt_embeds", "negative_prompt_embeds"}
    assert cond["prompt_embeds"].shape[0] == 1 and cond["prompt_embeds"].shape[2] == 32
    # Unpadded: the length follows the prompt (the template's suffix included, its prefix dropped).
    short = m.encode(_req(prompt="a fox"))["prompt_embeds"]
    assert short.shape[1] == cond["prompt_embeds"].shape[1] - 4  # 6 words -> 2
    assert set(m.encode(_req(guidance_scale=1.0))) == {"prompt_embeds"}  # no CFG at scale <= 1
    no_neg = m.encode(_req(negative_prompt=None))
    space = m.encode(_req(negative_prompt=" "))
    assert torch.equal(no_neg["negative_prompt_embeds"], space["negative_prompt_embeds"])


def _pipeline(m, tokenizer=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**dict(m.preset.scheduler_config)),
        vae=m.vae,
        text_encoder=m.text_encoders["text_encoder"],
        tokenizer=tokenizer,
        transformer=m.transformer,
    )


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_denoise_and_decode_match_the_pipeline(tiny, guidance):
    """guidance_scale is true_cfg_scale, negative_prompt the negative prompt: the same latent and image as
    QwenImagePipeline given our text embeddings."""
    import numpy as np

    m = tiny
    req = _req(guidance_scale=guidance)
    cond = m.encode(req)
    kw = dict(
        prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond.get("negative_prompt_embeds"),
        true_cfg_scale=guidance, height=req.height, width=req.width, num_inference_steps=3,
    )  # fmt: skip
    pipe = _pipeline(m)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="latent").images
    s = m.seq_len(req)
    y = m.denoise(m.init_latents(req), (0, s), cond, 0, 3, req)
    assert (y - want).abs().max().item() <= 1e-5
    img = pipe(**kw, generator=torch.Generator().manual_seed(req.seed), output_type="np").images
    ref = torch.from_numpy((img * 255).round().astype(np.uint8))
    assert (m.decode(y, req).int() - ref.int()).abs().max() <= 1
    if guidance > 1:  # the guidance changes the result
        unguided = m.denoise(m.init_latents(req), (0, s), cond, 0, 3, _req(guidance_scale=1.0))
        assert (unguided - y).abs().max().item() > 1e-3


def _qwen_tokenizer():
    """A byte-level Qwen2 tokenizer (no merges: one token per byte) with the chat template's specials."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def test_encode_matches_the_pipeline_with_a_real_tokenizer(tiny, tmp_path):
    """From a weights directory with a transformers Qwen2 tokenizer: encode() gives the pipeline's
    prompt embeddings (template, the pipeline's 34-token drop, last hidden state, max_sequence_length).
    With this byte-level tokenizer the templated prompt is 167 tokens, more than the 34 + 64 kept: the
    pipeline runs the encoder on all 167 and keeps [34, 98), encode() runs it on the first 98 (causal
    attention: the same values, up to the summation order of another length, hence 1e-6)."""
    from gfdit.models.tokenizer import HFTokenizer

    tiny.save_pretrained(tmp_path)
    target = tmp_path / "tokenizer"
    for f in target.iterdir():
        f.unlink()
    _qwen_tokenizer().save_pretrained(target)
    m = load_model(NAME, device="cpu", weights=tmp_path)
    assert isinstance(m.tokenizers["text_encoder"], HFTokenizer)
    assert m.weights_fingerprint() == tiny.weights_fingerprint()
    pipe = _pipeline(m, m.tokenizers["text_encoder"].tokenizer)
    req = _req(prompt="a cat", negative_prompt="fog")
    cond = m.encode(req)
    for key, text in (("prompt_embeds", req.prompt), ("negative_prompt_embeds", req.negative_prompt)):
        want, mask = pipe.encode_prompt(text, device=torch.device("cpu"), max_sequence_length=64)
        assert mask is None and cond[key].shape == want.shape
        assert (cond[key] - want).abs().max().item() <= 1e-6, (key, (cond[key] - want).abs().max().item())
