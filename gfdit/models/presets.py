"""Model presets: the diffusers / transformers configurations of each servable model, and its request limits.

Pure Python (no torch, no diffusers): the server can validate requests and the scheduler can read shapes
without importing a model. `gfdit.models.load_model` builds the modules from these configurations.

Note [Packed tokens]
~~~~~~~~~~~~~~~~~~~~
Both families keep the latent state in packed token form [B, S, C_tok]: the VAE latent
[B, C, F, H, W] (images: F = 1) is cut into patches of (pt, ph, pw) latent pixels; token s enumerates the
patch grid in (frame, row, column) order and its C_tok = C * pt * ph * pw channels are ordered
(c, pt, ph, pw). This is FluxPipeline._pack_latents for images, and for Wan the flattening that the
transformer's Conv3d patch embedding (kernel == stride) reads, so that the embedding is a Linear over
the packed channels. The token dimension (dim 1) is what sequence parallelism shards between ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

__all__ = [
    "MIN_DIFFUSERS_VERSION",
    "TextEncoderSpec",
    "ModelPreset",
    "PRESETS",
    "get_preset",
    "check_request",
    "runs_true_cfg",
]

# The oldest diffusers release with everything gfdit.models uses: FluxTransformer2DModel,
# WanTransformer3DModel, AutoencoderKLWan, and the attention refactor (FluxAttention / WanAttention with
# AttentionModuleMixin processors, dispatch_attention_fn) that the sequence-parallel processors subclass.
# Tested with 0.42.1. The lead mirrors this pin in pyproject.toml.
MIN_DIFFUSERS_VERSION = "0.35.0"


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a preset and the tokenizer that feeds it."""

    subfolder: str  # diffusers-layout folder of the weights: "text_encoder", "text_encoder_2"
    model_class: str  # transformers class: "CLIPTextModel", "T5EncoderModel", "UMT5EncoderModel", ...
    config: Mapping[str, Any]  # keyword arguments of the class's config (random initialisation)
    tokenizer_subfolder: str  # "tokenizer", "tokenizer_2"
    tokenizer_class: str  # transformers class used with weights=DIR: "CLIPTokenizer", "T5TokenizerFast", ...
    token_style: str  # offline hash tokenizer layout of special tokens: "clip", "t5" or "plain" (none)
    max_length: int  # tokens per prompt (padding and truncation length)
    role: str  # "pooled": pooled embedding (Flux CLIP); "sequence": per-token embeddings (T5 / UMT5)

    @property
    def vocab_size(self) -> int:
        if "vocab_size" not in self.config and "text_config" in self.config:  # Qwen2.5-VL: a nested config
            return int(self.config["text_config"]["vocab_size"])
        return int(self.config["vocab_size"])


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build one model and to check requests against it (immutable)."""

    name: str  # preset name, e.g. "flux-dev"; requests name it in Request.model
    family: str  # "flux", "qwen-image" (MMDiT images), "wan" or "wan2.2" (video)
    is_video: bool  # True: requests must give num_frames
    transformer_config: Mapping[str, Any]  # FluxTransformer2DModel / WanTransformer3DModel config
    vae_config: Mapping[str, Any]  # AutoencoderKL / AutoencoderKLWan config
    text_encoders: tuple[TextEncoderSpec, ...]  # in pipeline order
    latent_channels: int  # channels C of the VAE latent
    vae_scale_factor: int  # pixels per latent pixel along height and width
    patch_size: tuple[int, int, int]  # (pt, ph, pw) latent pixels per token (Note [Packed tokens])
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    size_multiple: int  # width and height must be multiples of this (vae_scale_factor * patch)
    default_steps: int  # num_inference_steps when the client gives none
    default_guidance: float  # guidance_scale when the client gives none
    default_dtype: str  # "float32" or "bfloat16": weights and activations of the transformer and encoders
    scheduler_config: Mapping[str, Any]  # FlowMatchEulerDiscreteScheduler config
    vae_temporal_factor: int = 1  # video: latent frames = (frames - 1) // vae_temporal_factor + 1
    max_frames: int = 0  # video: most frames per request (0 for images)
    frame_step: int = 1  # video: frames must be frame_step * k + 1 (Wan: 4k + 1)
    vae_dtype: str | None = None  # dtype of the VAE; None: default_dtype
    uses_cfg: bool = False  # classifier-free guidance with a negative prompt when guidance_scale > 1
    hd_flow_shift: float | None = None  # video: scheduler shift for >= hd_min_pixels per frame (else config)
    hd_min_pixels: int = 1280 * 720
    # Two-expert models (Wan2.2 A14B): the low-noise transformer (folder transformer_2), same class as the
    # first; None: one transformer. The first (high-noise) expert runs the steps whose timestep t >=
    # boundary_ratio * num_train_timesteps, the second the rest (WanPipeline's boundary_ratio).
    transformer_2_config: Mapping[str, Any] | None = None
    boundary_ratio: float | None = None
    # (width, height) of a request that names no size; None: 1024x1024 for images, 832x480 for video,
    # clamped to the limits.
    default_size: tuple[int, int] | None = None

    @property
    def token_dim(self) -> int:
        """C_tok: channels of one packed token."""
        return self.latent_channels * math.prod(self.patch_size)

    @property
    def num_heads(self) -> int:
        return int(self.transformer_config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.transformer_config["attention_head_dim"])

    @property
    def sequence_encoder(self) -> TextEncoderSpec:
        """The encoder whose per-token embeddings condition the transformer (its length limits prompts)."""
        return next(e for e in self.text_encoders if e.role == "sequence")

    def latent_frames(self, num_frames: int | None) -> int:
        if not self.is_video or num_frames is None:
            return 1
        return (num_frames - 1) // self.vae_temporal_factor + 1

    def token_grid(self, width: int, height: int, num_frames: int | None) -> tuple[int, int, int]:
        """(frames, rows, columns) of the packed token grid for a request of this size."""
        pt, ph, pw = self.patch_size
        s = self.vae_scale_factor
        return (self.latent_frames(num_frames) // pt, height // (s * ph), width // (s * pw))

    # -- shapes the planning core reads (Note [One model registry] in gfdit.cost) ---------------------
    @property
    def num_blocks(self) -> int:
        """Transformer blocks, each with one self-attention (Flux: double- plus single-stream)."""
        c = self.transformer_config
        return int(c.get("num_layers", 0)) + int(c.get("num_single_layers", 0))

    @property
    def hidden(self) -> int:
        """Model width: heads x head dim (elements per token in Ulysses' all-to-alls)."""
        return self.num_heads * self.head_dim

    @property
    def text_tokens(self) -> int:
        """Text tokens joined into the self-attention sequence: the sequence encoder's length for
        MMDiT (joint attention: "flux"; "qwen-image", whose prompts are not padded, counts a typical
        128 at most); 0 where text enters by cross-attention ("wan", "wan2.2")."""
        if self.family == "flux":
            return self.sequence_encoder.max_length
        if self.family == "qwen-image":
            return min(128, self.sequence_encoder.max_length)
        return 0

    def seq_len(self, width: int, height: int, num_frames: int | None) -> int:
        """S: the latent tokens of a request of this size, text excluded. The one definition: the
        models, the scheduler's state layout and the cost model all use it."""
        return math.prod(self.token_grid(width, height, num_frames))

    def valid_sp_degrees(
        self, width: int, height: int, num_frames: int | None, max_degree: int
    ) -> tuple[int, ...]:
        """The one rule for sequence-parallel degrees: d in [1, max_degree] divides the S latent
        tokens (even contiguous slices) and the attention heads (each member takes H/d heads). Text
        tokens are replicated on every member, so their count does not constrain d."""
        s = self.seq_len(width, height, num_frames)
        return tuple(d for d in range(1, max_degree + 1) if s % d == 0 and self.num_heads % d == 0)


def runs_true_cfg(preset: ModelPreset, request: Any) -> bool:
    """Whether `request` runs true classifier-free guidance on `preset`: two predictions per step
    (conditional and unconditional), so it may run CFG-parallel (Note [CFG-parallel] in
    gfdit/models/base.py). Flux's distilled guidance is not: one prediction."""
    return bool(preset.uses_cfg) and request.guidance_scale > 1.0


def check_request(
    preset: ModelPreset, request: Any, count_tokens: Callable[[str], int] | None = None
) -> None:
    """Raise ValueError, naming the field, if `request` (a gfdit.request.Request or any object with its
    fields) cannot run on `preset`. `count_tokens(text)` gives the prompt's tokens for the sequence
    encoder (specials included); None skips the prompt-length check."""
    name = preset.name
    if request.model != name:
        raise ValueError(f"model: request is for {request.model!r} but this model is {name!r}")
    m = preset.size_multiple
    for fld, lo, hi in (
        ("width", preset.min_width, preset.max_width),
        ("height", preset.min_height, preset.max_height),
    ):
        v = getattr(request, fld)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{fld} must be an integer, got {v!r}")
        if v % m:
            raise ValueError(
                f"{fld} must be a multiple of {m} (VAE x{preset.vae_scale_factor} times patch "
                f"{preset.patch_size[1]}) for {name}, got {v}"
            )
        if not lo <= v <= hi:
            raise ValueError(f"{fld} must be in [{lo}, {hi}] for {name}, got {v}")
    steps = request.num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    frames = request.num_frames
    if preset.is_video:
        if frames is None:
            raise ValueError(f"num_frames is required for the video model {name}")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
        if (frames - 1) % preset.frame_step:
            raise ValueError(f"num_frames must be {preset.frame_step}k+1 for {name}, got {frames}")
        if frames > preset.max_frames:
            raise ValueError(f"num_frames must be at most {preset.max_frames} for {name}, got {frames}")
    elif frames is not None:
        raise ValueError(f"num_frames must be None for the image model {name}, got {frames!r}")
    g = request.guidance_scale
    if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
    prompts = [("prompt", request.prompt)]
    if preset.uses_cfg:
        prompts.append(("negative_prompt", request.negative_prompt))
    for fld, text in prompts:
        if text is None and fld == "negative_prompt":
            continue
        if not isinstance(text, str):
            raise ValueError(f"{fld} must be a string, got {type(text).__name__}")
        if count_tokens is not None:
            n, limit = count_tokens(text), preset.sequence_encoder.max_length
            if n > limit:
                raise ValueError(f"{fld} is too long for {name}: {n} tokens, at most {limit}")


# -- configurations ----------------------------------------------------------------------------------------

_FLOW_FLUX = _frozen(
    # FLUX.1-dev scheduler/scheduler_config.json: resolution-dependent (dynamic) shifting.
    dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
)
# Wan pipelines use a fixed flow shift: 3.0 for 480p, 5.0 for 720p (WanPipeline's docstring).
_FLOW_WAN = _frozen(dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False))

_WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _clip(config: dict[str, Any], max_length: int) -> TextEncoderSpec:
    return TextEncoderSpec(
        subfolder="text_encoder",
        model_class="CLIPTextModel",
        config=_frozen(config),
        tokenizer_subfolder="tokenizer",
        tokenizer_class="CLIPTokenizer",
        token_style="clip",
        max_length=max_length,
        role="pooled",
    )


def _t5(config: dict[str, Any], max_length: int, *, umt5: bool) -> TextEncoderSpec:
    return TextEncoderSpec(
        subfolder="text_encoder" if umt5 else "text_encoder_2",
        model_class="UMT5EncoderModel" if umt5 else "T5EncoderModel",
        config=_frozen(config),
        tokenizer_subfolder="tokenizer" if umt5 else "tokenizer_2",
        tokenizer_class="AutoTokenizer" if umt5 else "T5TokenizerFast",
        token_style="t5",
        max_length=max_length,
        role="sequence",
    )


def _flux_vae(block_out_channels, layers_per_block: int, norm_num_groups: int) -> Mapping[str, Any]:
    n = len(block_out_channels)
    return _frozen(
        dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn="silu",
            latent_channels=16,
            norm_num_groups=norm_num_groups,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
            force_upcast=True,
        )
    )


def _wan_vae(base_dim: int, dim_mult, num_res_blocks: int) -> Mapping[str, Any]:
    return _frozen(
        dict(
            base_dim=base_dim,
            z_dim=16,
            dim_mult=tuple(dim_mult),
            num_res_blocks=num_res_blocks,
            attn_scales=(),
            temperal_downsample=(False, True, True),
            dropout=0.0,
            latents_mean=_WAN_LATENTS_MEAN,
            latents_std=_WAN_LATENTS_STD,
        )
    )


def _wan_transformer(
    heads: int, layers: int, ffn_dim: int, head_dim: int, text_dim: int, freq_dim: int, channels: int = 16
):
    return _frozen(
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=channels,
            out_channels=channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )
    )


# The Wan2.2 VAE of TI2V-5B (vae/config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers): 48 latent channels, 16x
# spatial compression (8x in the network, then 2x2 pixel patches: 12 = 3 x 2 x 2 input channels), 4x
# temporal, residual down/up blocks, a wider decoder.
_WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
_WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def _wan22_vae(base_dim: int, decoder_base_dim: int, dim_mult, num_res_blocks: int) -> Mapping[str, Any]:
    return _frozen(
        dict(
            base_dim=base_dim,
            decoder_base_dim=decoder_base_dim,
            z_dim=48,
            dim_mult=tuple(dim_mult),
            num_res_blocks=num_res_blocks,
            attn_scales=(),
            temperal_downsample=(False, True, True),
            dropout=0.0,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=_WAN22_LATENTS_MEAN,
            latents_std=_WAN22_LATENTS_STD,
        )
    )


# CLIP-L/14 text tower and T5-v1.1-XXL encoder as FLUX.1-dev ships them (eos_token_id 2 is the legacy
# value of that config: the pooled token is the argmax id, i.e. <|endoftext|>).
_CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip
_T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
_UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
# Tiny encoders for CPU tests: one layer, width 32.
_TINY_CLIP = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=998, eos_token_id=999, pad_token_id=999,
)  # fmt: skip
_TINY_T5 = dict(
    vocab_size=1000, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, relative_attention_max_distance=32, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1,
)  # fmt: skip


# Qwen-Image (scheduler/scheduler_config.json of Qwen/Qwen-Image): exponential time shift, dynamic in the
# token count up to 8192 tokens, and a terminal sigma stretched to 0.02.
_FLOW_QWEN = _frozen(
    dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
)
# Qwen2.5-VL-7B-Instruct, Qwen-Image's text encoder (its language model's last hidden state conditions the
# transformer; the vision tower is built and never run, as in QwenImagePipeline). Sub-configs stay plain
# dicts: transformers reads them with isinstance(..., dict).
_QWEN25_VL_7B = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_channels=3, hidden_act="silu", tokens_per_second=2,
    ),
)  # fmt: skip
# Tiny Qwen2.5-VL for CPU tests: one text layer of width 32 (mrope sections sum to head_dim / 2 = 8), a
# one-block vision tower; special ids inside the 1000-word vocabulary.
_TINY_QWEN25_VL = dict(
    text_config=dict(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=998, eos_token_id=999, pad_token_id=999,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
    ),
    vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
    ),
    image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993,
)  # fmt: skip


def _qwen_vl(config: dict[str, Any], max_length: int) -> TextEncoderSpec:
    return TextEncoderSpec(
        subfolder="text_encoder",
        model_class="Qwen2_5_VLForConditionalGeneration",
        config=_frozen(config),
        tokenizer_subfolder="tokenizer",
        tokenizer_class="Qwen2Tokenizer",
        token_style="plain",
        max_length=max_length,  # QwenImagePipeline's max_sequence_length (tokens after the template prefix)
        role="sequence",
    )


def _qwen_vae(base_dim: int, dim_mult, num_res_blocks: int) -> Mapping[str, Any]:
    # AutoencoderKLQwenImage: the Wan 2.1 VAE layout and latent statistics (16 channels, 8x spatial).
    return _frozen(
        dict(
            base_dim=base_dim,
            z_dim=16,
            dim_mult=tuple(dim_mult),
            num_res_blocks=num_res_blocks,
            attn_scales=(),
            temperal_downsample=(False, True, True),
            dropout=0.0,
            latents_mean=_WAN_LATENTS_MEAN,
            latents_std=_WAN_LATENTS_STD,
        )
    )


def _qwen_image(name: str, transformer: dict[str, Any], text_encoder, vae, limits, default_steps, dtype):
    lo, hi = limits
    return ModelPreset(
        name=name,
        family="qwen-image",
        is_video=False,
        transformer_config=_frozen(transformer),
        vae_config=vae,
        text_encoders=(text_encoder,),
        latent_channels=16,
        vae_scale_factor=8,
        patch_size=(1, 2, 2),
        min_width=lo,
        max_width=hi,
        min_height=lo,
        max_height=hi,
        size_multiple=16,
        default_steps=default_steps,
        default_guidance=4.0,  # QwenImagePipeline's true_cfg_scale default
        default_dtype=dtype,
        scheduler_config=_FLOW_QWEN,
        uses_cfg=True,  # true CFG: guidance_scale is the pipeline's true_cfg_scale
    )


def _flux(name: str, transformer: dict[str, Any], text_encoders, vae, limits, default_steps, dtype):
    lo, hi = limits
    return ModelPreset(
        name=name,
        family="flux",
        is_video=False,
        transformer_config=_frozen(transformer),
        vae_config=vae,
        text_encoders=tuple(text_encoders),
        latent_channels=16,
        vae_scale_factor=8,
        patch_size=(1, 2, 2),
        min_width=lo,
        max_width=hi,
        min_height=lo,
        max_height=hi,
        size_multiple=16,
        default_steps=default_steps,
        default_guidance=3.5,
        default_dtype=dtype,
        scheduler_config=_FLOW_FLUX,
    )


def _wan(name: str, transformer, text_encoder, vae, limits, max_frames, default_steps, dtype):
    lo, hi = limits
    return ModelPreset(
        name=name,
        family="wan",
        is_video=True,
        transformer_config=transformer,
        vae_config=vae,
        text_encoders=(text_encoder,),
        latent_channels=16,
        vae_scale_factor=8,
        patch_size=(1, 2, 2),
        min_width=lo,
        max_width=hi,
        min_height=lo,
        max_height=hi,
        size_multiple=16,
        default_steps=default_steps,
        default_guidance=5.0,
        default_dtype=dtype,
        scheduler_config=_FLOW_WAN,
        vae_temporal_factor=4,
        max_frames=max_frames,
        frame_step=4,
        vae_dtype="float32",  # as WanPipeline's examples load it
        uses_cfg=True,
        hd_flow_shift=5.0,
    )


def _wan22(preset: ModelPreset, *, shift: float, guidance: float, transformer_2=None, boundary_ratio=None):
    """A Wan preset as a Wan2.2 one: its own fixed flow shift at every size, its guidance, and the optional
    low-noise expert."""
    return replace(
        preset,
        family="wan2.2",
        scheduler_config=_frozen({**_FLOW_WAN, "shift": shift}),
        hd_flow_shift=None,
        default_guidance=guidance,
        transformer_2_config=transformer_2,
        boundary_ratio=boundary_ratio,
    )


def _builtin() -> dict[str, ModelPreset]:
    tiny_flux = _flux(
        "tiny-flux",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),  # fmt: skip
        [_clip(_TINY_CLIP, 16), _t5(_TINY_T5, 64, umt5=False)],
        _flux_vae((8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        limits=(32, 256),
        default_steps=4,
        dtype="float32",
    )
    flux_dev = _flux(
        "flux-dev",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),  # fmt: skip
        [_clip(_CLIP_L, 77), _t5(_T5_XXL, 512, umt5=False)],
        _flux_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        limits=(256, 2048),
        default_steps=28,
        dtype="bfloat16",
    )
    tiny_wan = _wan(
        "tiny-wan",
        _wan_transformer(heads=4, layers=2, ffn_dim=64, head_dim=16, text_dim=32, freq_dim=32),
        _t5(dict(_TINY_T5), 32, umt5=True),
        _wan_vae(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        limits=(32, 128),
        max_frames=17,
        default_steps=4,
        dtype="float32",
    )
    wan_vae = _wan_vae(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    umt5 = _t5(_UMT5_XXL, 512, umt5=True)
    wan_13 = _wan(
        "wan2.1-1.3b",
        _wan_transformer(heads=12, layers=30, ffn_dim=8960, head_dim=128, text_dim=4096, freq_dim=256),
        umt5,
        wan_vae,
        limits=(256, 1280),
        max_frames=81,
        default_steps=50,
        dtype="bfloat16",
    )
    wan_14 = _wan(
        "wan2.1-14b",
        _wan_transformer(heads=40, layers=40, ffn_dim=13824, head_dim=128, text_dim=4096, freq_dim=256),
        umt5,
        wan_vae,
        limits=(256, 1280),
        max_frames=81,
        default_steps=50,
        dtype="bfloat16",
    )
    tiny_qwen = _qwen_image(
        "tiny-qwen-image",
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=32,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),  # fmt: skip
        _qwen_vl(_TINY_QWEN25_VL, 64),
        _qwen_vae(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        limits=(32, 256),
        default_steps=4,
        dtype="float32",
    )
    tiny_qwen = replace(tiny_qwen, default_size=(128, 128))  # requests without a size: 128x128
    qwen = _qwen_image(
        "qwen-image",
        # transformer/config.json of Qwen/Qwen-Image (20 B parameters).
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),  # fmt: skip
        _qwen_vl(_QWEN25_VL_7B, 512),
        _qwen_vae(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
        limits=(256, 2048),
        default_steps=50,
        dtype="bfloat16",
    )
    # Wan2.2 (the Wan2.2 repository's configs wan_t2v_A14B.py / wan_ti2v_5B.py for the sampling constants):
    # the same WanTransformer3DModel blocks; A14B has two 14B experts split at boundary 0.875 with flow
    # shift 12 (40 steps, guidance 4.0 high-noise / 3.0 low-noise: one guidance_scale here, used by both
    # experts as WanPipeline does without guidance_scale_2); TI2V-5B has one 5B transformer on the
    # 48-channel 16x VAE, shift 5, 50 steps, guidance 5, 121 frames at 24 fps, 1280x704 for "720p".
    tiny_wan22 = _wan22(
        _wan(
            "tiny-wan2.2",
            _wan_transformer(heads=4, layers=2, ffn_dim=64, head_dim=16, text_dim=32, freq_dim=32),
            _t5(dict(_TINY_T5), 32, umt5=True),
            _wan_vae(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
            limits=(32, 128),
            max_frames=17,
            default_steps=4,
            dtype="float32",
        ),
        shift=12.0,
        guidance=4.0,
        transformer_2=_wan_transformer(heads=4, layers=2, ffn_dim=64, head_dim=16, text_dim=32, freq_dim=32),
        boundary_ratio=0.875,
    )
    tiny_ti2v = _wan22(
        replace(
            _wan(
                "tiny-wan2.2-ti2v",
                _wan_transformer(
                    heads=4, layers=2, ffn_dim=64, head_dim=16, text_dim=32, freq_dim=32, channels=48
                ),
                _t5(dict(_TINY_T5), 32, umt5=True),
                _wan22_vae(base_dim=8, decoder_base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
                limits=(64, 256),
                max_frames=17,
                default_steps=4,
                dtype="float32",
            ),
            latent_channels=48,
            vae_scale_factor=16,
            size_multiple=32,
        ),
        shift=5.0,
        guidance=5.0,
    )
    a14b = _wan(
        "wan2.2-t2v-a14b",
        _wan_transformer(heads=40, layers=40, ffn_dim=13824, head_dim=128, text_dim=4096, freq_dim=256),
        umt5,
        wan_vae,
        limits=(256, 1280),
        max_frames=81,
        default_steps=40,
        dtype="bfloat16",
    )
    a14b = _wan22(a14b, shift=12.0, guidance=4.0, transformer_2=a14b.transformer_config, boundary_ratio=0.875)
    ti2v = _wan22(
        replace(
            _wan(
                "wan2.2-ti2v-5b",
                _wan_transformer(
                    heads=24, layers=30, ffn_dim=14336, head_dim=128, text_dim=4096, freq_dim=256, channels=48
                ),
                umt5,
                _wan22_vae(base_dim=160, decoder_base_dim=256, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
                limits=(256, 1280),
                max_frames=121,
                default_steps=50,
                dtype="bfloat16",
            ),
            latent_channels=48,
            vae_scale_factor=16,
            size_multiple=32,
        ),
        shift=5.0,
        guidance=5.0,
    )
    presets = (
        tiny_flux, tiny_wan, tiny_qwen, tiny_wan22, tiny_ti2v, flux_dev, wan_13, wan_14, qwen, a14b, ti2v,
    )  # fmt: skip
    return {p.name: p for p in presets}


PRESETS: Mapping[str, ModelPreset] = MappingProxyType(_builtin())


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; ValueError naming the known presets if there is none."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
