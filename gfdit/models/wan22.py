"""Wan 2.2 (text-to-video): WanModel with what diffusers' WanPipeline adds for Wan2.2.

- Two experts (T2V-A14B): `transformer` (high noise) runs the steps whose timestep t >= boundary_ratio *
  num_train_timesteps, `transformer_2` (low noise) the rest, as WanPipeline with boundary_ratio. Both
  are resident on every rank (Note [Model state and ranks]); the switch happens inside a request, at
  the first step below the boundary, whatever the chunking: `denoise` splits its step range at the
  switch, so each part runs one expert and a chunk may start, end or straddle it. The expert is a
  non-tensor input of the step (ctx["expert"]), so a captured step graph (gfdit.runtime.graphs) is
  keyed by it and never replays one expert's graph for the other.
- TI2V-5B: one transformer on the 48-channel VAE with 16x spatial compression (AutoencoderKLWan with
  patch_size 2 and residual blocks); the latent is packed like Wan 2.1's (Note [Packed tokens]), only
  with 48 channels. WanPipeline runs it with expand_timesteps (one timestep per token, from a mask that
  is all ones for text-to-video): every token gets the step's timestep, which is what one timestep per
  sample computes, so the step runs as Wan 2.1's.
The scheduler is FlowMatchEulerDiscreteScheduler with the preset's fixed shift (gfdit.models.wan).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gfdit.models.base import load_diffusers, log_loaded
from gfdit.models.presets import ModelPreset
from gfdit.models.sp import install_wan_processors
from gfdit.models.wan import WanModel

__all__ = ["Wan22Model", "kHighNoise", "kLowNoise"]

kHighNoise = "transformer"  # the expert names: their diffusers folders
kLowNoise = "transformer_2"


class Wan22Model(WanModel):
    family = "wan2.2"
    transformer_2 = None  # the low-noise expert (two-expert presets), or None

    @classmethod
    def load(
        cls,
        preset: ModelPreset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        weights: str | os.PathLike | None,
        components: Iterable[str],
    ) -> Wan22Model:
        components = tuple(components)
        model = super().load(preset, device=device, dtype=dtype, weights=weights, components=components)
        if preset.transformer_2_config is not None and "transformer" in components:
            t0 = time.perf_counter()
            model.transformer_2 = load_diffusers(
                cls.transformer_class, preset.transformer_2_config, kLowNoise, device, dtype, weights
            )
            log_loaded(kLowNoise, model.transformer_2, device, t0)
            install_wan_processors(model.transformer_2)
        return model

    # -- experts -------------------------------------------------------------------------------------
    def boundary_timestep(self) -> float | None:
        """Timesteps >= this run on the high-noise expert (None: one transformer)."""
        p = self.preset
        if p.boundary_ratio is None:
            return None
        return p.boundary_ratio * p.scheduler_config["num_train_timesteps"]

    def experts(self, request) -> list[str]:
        """The expert of every step of the request (kHighNoise or kLowNoise), as WanPipeline picks it."""
        boundary = self.boundary_timestep()
        ts = self.timesteps(request).timesteps
        if boundary is None:
            return [kHighNoise] * len(ts)
        return [kHighNoise if float(t) >= boundary else kLowNoise for t in ts]

    def _expert(self, name: str) -> torch.nn.Module:
        module = self.transformer if name == kHighNoise else self.transformer_2
        if module is None:
            raise RuntimeError(f"{self.preset.name}: expert {name!r} is not loaded")
        return module

    def denoise(
        self,
        latents_local: torch.Tensor,
        token_range: tuple[int, int],
        cond: Mapping[str, torch.Tensor],
        start: int,
        end: int,
        request,
        group=None,
        on_step=None,
        cfg_group=None,
    ) -> torch.Tensor:
        """DiTModel.denoise, the step range split where the expert changes (each part one expert)."""
        steps = request.num_inference_steps
        if not 0 <= start <= end <= steps:
            raise ValueError(f"denoise: need 0 <= start <= end <= {steps}, got start={start}, end={end}")
        experts = self.experts(request)
        x = latents_local
        i = start
        while True:
            j = i
            while j < end and experts[j] == experts[i]:
                j += 1
            self._current_expert = experts[i] if i < end else kHighNoise
            try:
                x = super().denoise(
                    x, token_range, cond, i, j, request, group=group, on_step=on_step, cfg_group=cfg_group
                )
            finally:
                self._current_expert = None
            if j >= end:
                return x
            i = j

    def _prepare_batch(self, conds, requests, group) -> dict[str, Any]:
        raise NotImplementedError(
            "Wan2.2 requests are not denoised in batches yet: a batch would have to split its steps where "
            "the expert changes, as denoise() does for one request"
        )

    def _prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        ctx = super()._prepare(cond, request, group)
        ctx["expert"] = getattr(self, "_current_expert", None) or kHighNoise
        return ctx

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        return self._guided(self._expert(ctx["expert"]), x, t, ctx, group)

    # -- weights -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """WanModel.save_pretrained plus transformer_2/ and WanPipeline's boundary_ratio and
        expand_timesteps (TI2V-5B) in model_index.json."""
        import json

        super().save_pretrained(directory)
        path = os.path.join(directory, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        if self.transformer_2 is not None:
            self.transformer_2.save_pretrained(os.path.join(directory, kLowNoise))
            index[kLowNoise] = ["diffusers", type(self.transformer_2).__name__]
        index["boundary_ratio"] = self.preset.boundary_ratio
        index["expand_timesteps"] = self.preset.latent_channels == 48
        with open(path, "w") as f:
            json.dump(index, f, indent=2)

    def weights_fingerprint(self) -> dict[str, float]:
        out = super().weights_fingerprint()
        if self.transformer_2 is not None:
            with torch.no_grad():
                out[kLowNoise] = float(sum(p.double().sum() for p in self.transformer_2.parameters()))
        return out
