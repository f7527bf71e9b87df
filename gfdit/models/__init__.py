"""Model layer of the runtime: real DiT architectures from diffusers with sequence parallelism over a
gfcoll group passed per call.

`presets` is pure Python and imported eagerly; the torch / diffusers parts (`load_model`, `DiTModel`, the
families, `sp`) are imported on first use, so that `gfdit.models.presets` stays light.
"""

from __future__ import annotations

from gfdit.models.presets import (
    MIN_DIFFUSERS_VERSION,
    PRESETS,
    ModelPreset,
    TextEncoderSpec,
    check_request,
    get_preset,
)

__all__ = [
    "MIN_DIFFUSERS_VERSION",
    "PRESETS",
    "ModelPreset",
    "TextEncoderSpec",
    "check_request",
    "get_preset",
    "DiTModel",
    "load_model",
]


def __getattr__(name: str):
    if name == "DiTModel":
        from gfdit.models import base

        return base.DiTModel
    if name == "load_model":
        from gfdit.models import loader

        return loader.load_model
    raise AttributeError(f"module 'gfdit.models' has no attribute {name!r}")
