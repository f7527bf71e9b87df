"""`load_model`: a preset's DiTModel of its family, built on a device (the models' one entry point).

It sits above the families (gfdit.models.flux, gfdit.models.wan), which sit above gfdit.models.base:
the base class never imports a family.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from gfdit.models.base import COMPONENTS, DiTModel, torch_dtype
from gfdit.models.flux import FluxModel
from gfdit.models.presets import ModelPreset, get_preset
from gfdit.models.qwen_image import QwenImageModel
from gfdit.models.wan import WanModel
from gfdit.models.wan22 import Wan22Model

__all__ = ["kFamilies", "load_model"]

# ModelPreset.family -> its DiTModel class.
kFamilies: dict[str, type[DiTModel]] = {
    "flux": FluxModel, "wan": WanModel, "wan2.2": Wan22Model, "qwen-image": QwenImageModel,
}  # fmt: skip


def load_model(
    name_or_preset: str | ModelPreset,
    *,
    device: str | torch.device,
    dtype: str | torch.dtype | None = None,
    weights: str | os.PathLike | None = None,
    components: Sequence[str] = COMPONENTS,
) -> DiTModel:
    """Build a model on `device` (every rank calls it for its own copy; Note [Model state and ranks]).

    dtype: None for the preset's default (bf16 for full-size presets, fp32 for tiny ones).
    weights: None for random initialisation from the preset, directly on `device` in `dtype`; or a local
    directory in diffusers layout (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
    tokenizer_2/) loaded with from_pretrained(local_files_only=True). Nothing is downloaded.
    components: which of "text", "transformer", "vae" to load (tokenizers always are)."""
    preset = get_preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    cls = kFamilies.get(preset.family)
    if cls is None:
        raise ValueError(f"unknown model family {preset.family!r}")
    dt = torch_dtype(dtype if dtype is not None else preset.default_dtype)
    return cls.load(preset, device=torch.device(device), dtype=dt, weights=weights, components=components)
