"""Flux (MMDiT, images): FluxTransformer2DModel + AutoencoderKL + CLIP (pooled) and T5 (sequence) encoders,
following diffusers' FluxPipeline: distilled guidance through the guidance embedding (no CFG), dynamic
flow shift from the image's token count, packed 2x2 latent patches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from gfdit.models.base import DiTModel, to_uint8
from gfdit.models.sp import install_flux_processors

__all__ = ["FluxModel", "flux_shift"]


def flux_shift(
    seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """The timestep shift `mu` Flux pipelines use for `seq_len` image tokens: linear in the token
    count, base_shift at base_seq_len and max_shift at max_seq_len (the value diffusers' FluxPipeline
    computes; tests/unit/test_models.py checks the two agree). Computed here so that the runtime
    does not import the pipeline module, which pulls in image processors it never uses."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


class FluxModel(DiTModel):
    family = "flux"
    pipeline_class_name = "FluxPipeline"
    transformer_class = FluxTransformer2DModel
    vae_class = AutoencoderKL

    def _install_processors(self) -> None:
        install_flux_processors(self.transformer)

    def encode(self, request) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": [1, T, joint_attention_dim] (T5, T = its max length),
        "pooled_prompt_embeds": [1, pooled_projection_dim] (CLIP pooled output)}. FluxPipeline truncates
        the CLIP prompt silently; the T5 prompt length is checked by validate()."""
        self.require("text")
        out = {}
        with torch.no_grad():
            for spec in self.preset.text_encoders:
                ids, _ = self.tokenizers[spec.subfolder].encode([request.prompt], spec.max_length)
                enc = self.text_encoders[spec.subfolder]
                res = enc(ids.to(self.device), output_hidden_states=False)
                if spec.role == "pooled":
                    out["pooled_prompt_embeds"] = res.pooler_output.to(self.dtype)
                else:
                    out["prompt_embeds"] = res[0].to(self.dtype)
        return out

    def timesteps(self, request) -> FlowMatchEulerDiscreteScheduler:
        cfg = self.preset.scheduler_config
        scheduler = FlowMatchEulerDiscreteScheduler(**dict(cfg))
        n = request.num_inference_steps
        mu = flux_shift(
            self.seq_len(request),
            cfg["base_image_seq_len"],
            cfg["max_image_seq_len"],
            cfg["base_shift"],
            cfg["max_shift"],
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device=self.device)
        return scheduler

    def image_ids(self, request) -> torch.Tensor:
        """Position ids [S, 3] = (0, row, column) of every latent token (FluxPipeline's latent image ids)."""
        _, h, w = self.token_grid(request)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(self.device)

    def _prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        embeds = self._cond(cond, "prompt_embeds")
        pooled = self._cond(cond, "pooled_prompt_embeds")
        t_len = embeds.shape[1]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], request.guidance_scale, device=self.device, dtype=torch.float32)
        return {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
            "guidance": guidance,
            # The full grid's ids: RoPE is applied to the whole sequence after the all-to-all.
            "img_ids": self.image_ids(request),
            "txt_ids": torch.zeros(t_len, 3, device=self.device),
            "joint_attention_kwargs": None if group is None else {"sp_group": group, "sp_text_len": t_len},
        }

    def _prepare_batch(self, conds, requests, group) -> dict[str, Any]:
        """_prepare for a batch (Note [Batched steps] in gfdit/models/batch.py): text embeddings and the
        distilled guidance stacked one row per request; position ids shared (one token grid)."""
        embeds = torch.cat([self._cond(c, "prompt_embeds") for c in conds])
        pooled = torch.cat([self._cond(c, "pooled_prompt_embeds") for c in conds])
        t_len = embeds.shape[1]
        guidance = None
        if self.transformer.config.guidance_embeds:
            scales = [float(r.guidance_scale) for r in requests]
            guidance = torch.tensor(scales, device=self.device, dtype=torch.float32)
        return {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
            "guidance": guidance,
            "img_ids": self.image_ids(requests[0]),
            "txt_ids": torch.zeros(t_len, 3, device=self.device),
            "joint_attention_kwargs": None if group is None else {"sp_group": group, "sp_text_len": t_len},
        }

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        # t: one timestep (a request alone) or one per row [B] (Note [Batched steps]).
        timestep = t.expand(x.shape[0]).to(self.dtype)
        return self.transformer(
            hidden_states=x.to(self.dtype), timestep=timestep / 1000, return_dict=False, **ctx
        )[0]

    def decode(self, latents_full: torch.Tensor, request) -> torch.Tensor:
        """uint8 [1, H, W, 3] on CPU (FluxPipeline: unpack, / scaling_factor + shift_factor, VAE decode)."""
        self.require("vae")
        cfg = self.vae.config
        with torch.no_grad():
            lat = self.unpack_latents(latents_full.to(device=self.device, dtype=torch.float32), request)
            lat = lat / cfg.scaling_factor + cfg.shift_factor
            image = self.vae.decode(lat.to(self._vae_dtype()), return_dict=False)[0]
        return to_uint8(image)
