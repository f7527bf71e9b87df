"""Wan 2.1 (text-to-video): WanTransformer3DModel + AutoencoderKLWan + UMT5 encoder, following diffusers'
WanPipeline: classifier-free guidance with a negative prompt when guidance_scale > 1, zero-padded prompt
embeddings, latents_mean/std around the VAE. The scheduler is FlowMatchEulerDiscreteScheduler with the
pipeline's flow shift (3.0, or 5.0 from 720p up) instead of WanPipeline's default UniPC: a one-step
scheduler has no history, so a request can change ranks between any two steps."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from gfdit.models.base import DiTModel, to_uint8
from gfdit.models.sp import install_wan_processors, wan_forward, wan_rotary

__all__ = ["WanModel"]


def _clean(text: str) -> str:
    # WanPipeline's prompt_clean without ftfy (optional there; left out so every machine cleans alike).
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanModel(DiTModel):
    family = "wan"
    pipeline_class_name = "WanPipeline"
    transformer_class = WanTransformer3DModel
    vae_class = AutoencoderKLWan

    def _install_processors(self) -> None:
        install_wan_processors(self.transformer)

    def uses_cfg(self, request) -> bool:
        return request.guidance_scale > 1.0

    def encode(self, request) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": [1, L, text_dim]} and, when guidance_scale > 1, "negative_prompt_embeds"
        (of negative_prompt, "" if None); L is the encoder's max length, padding positions zeroed."""
        self.require("text")
        spec = self.preset.sequence_encoder
        tok, enc = self.tokenizers[spec.subfolder], self.text_encoders[spec.subfolder]

        def embed(text: str) -> torch.Tensor:
            ids, mask = tok.encode([_clean(text)], spec.max_length)
            hidden = enc(ids.to(self.device), mask.to(self.device)).last_hidden_state.to(self.dtype)
            n = int(mask.sum())
            out = torch.zeros_like(hidden)
            out[:, :n] = hidden[:, :n]
            return out

        with torch.no_grad():
            cond = {"prompt_embeds": embed(request.prompt)}
            if self.uses_cfg(request):
                cond["negative_prompt_embeds"] = embed(request.negative_prompt or "")
        return cond

    def flow_shift(self, request) -> float:
        p = self.preset
        if p.hd_flow_shift is not None and request.width * request.height >= p.hd_min_pixels:
            return p.hd_flow_shift
        return float(p.scheduler_config["shift"])

    def timesteps(self, request) -> FlowMatchEulerDiscreteScheduler:
        cfg = dict(self.preset.scheduler_config)
        cfg["shift"] = self.flow_shift(request)
        scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        return scheduler

    def _prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        context = self._cond(cond, "prompt_embeds")
        cfg = self.uses_cfg(request)
        if cfg:
            # Conditional and unconditional predictions in one batch of 2.
            context = torch.cat([context, self._cond(cond, "negative_prompt_embeds")])
        grid = self.token_grid(request)
        return {
            "context": context,
            "cfg": cfg,
            "guidance_scale": float(request.guidance_scale),
            "grid": grid,
            "rotary": wan_rotary(self.transformer, grid, self.device),  # full grid, once per call
            "group": group,
        }

    def _prepare_batch(self, conds, requests, group) -> dict[str, Any]:
        """_prepare for a batch (Note [Batched steps] in gfdit/models/batch.py): the context rows are
        every request's prompt embeddings, then the negative prompt embeddings of the requests that use
        CFG ("cfg_rows": their batch indices), with their guidance scales [U, 1, 1] (fp32)."""
        rows = tuple(k for k, r in enumerate(requests) if self.uses_cfg(r))
        context = [self._cond(c, "prompt_embeds") for c in conds]
        context += [self._cond(conds[k], "negative_prompt_embeds") for k in rows]
        scales = [float(requests[k].guidance_scale) for k in rows]
        grid = self.token_grid(requests[0])
        return {
            "context": torch.cat(context),
            "cfg_rows": rows,
            "guidance": torch.tensor(scales, device=self.device, dtype=torch.float32).view(-1, 1, 1),
            "grid": grid,
            "rotary": wan_rotary(self.transformer, grid, self.device),
            "group": group,
        }

    def _velocity_rows(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        """_velocity of a batch: x [B, S/d, C_tok], t [B] (Note [Batched steps])."""
        b, rows = x.shape[0], ctx["cfg_rows"]
        tokens, ts = x.to(self.dtype), t
        if rows:
            # Slices and cat, not index tensors: nothing here copies from the host (graph capture).
            every = len(rows) == b
            extra = tokens if every else torch.cat([tokens[k : k + 1] for k in rows])
            extra_t = t if every else torch.cat([t[k : k + 1] for k in rows])
            tokens, ts = torch.cat([tokens, extra]), torch.cat([t, extra_t])
        forward = getattr(self, "wan_forward_fn", wan_forward)  # compiled in --compile full
        out = forward(self.transformer, tokens, ts, ctx["context"], ctx["grid"], ctx["rotary"], group).float()
        if not rows:
            return out
        cond, uncond, g = out[:b], out[b:], ctx["guidance"]
        if len(rows) == b:
            return uncond + g * (cond - uncond)
        pieces = [cond[k : k + 1] for k in range(b)]
        for u, k in enumerate(rows):
            pieces[k] = uncond[u : u + 1] + g[u : u + 1] * (cond[k : k + 1] - uncond[u : u + 1])
        return torch.cat(pieces)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        if "cfg_rows" in ctx:  # a batch of requests (_prepare_batch)
            return self._velocity_rows(x, t, ctx, group)
        return self._guided(self.transformer, x, t, ctx, group)

    def _guided(self, module, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        """The guided prediction of `module` (Wan2.2: the step's expert): both branches as one batch
        of 2, or, CFG-parallel (ctx["cfg_pair"], Note [CFG-parallel]), this rank's branch only."""
        forward = getattr(self, "wan_forward_fn", wan_forward)  # compiled in --compile full
        pair = ctx.get("cfg_pair")
        if pair is not None:
            branch = pair.rank
            context = ctx["context"][branch : branch + 1]
            mine = forward(module, x.to(self.dtype), t.expand(1), context, ctx["grid"], ctx["rotary"], group)
            cond, uncond = self.cfg_exchange(mine.float(), ctx)
            return uncond + ctx["guidance_scale"] * (cond - uncond)
        b = 2 if ctx["cfg"] else 1
        tokens = x.to(self.dtype).expand(b, -1, -1)
        out = forward(module, tokens, t.expand(b), ctx["context"], ctx["grid"], ctx["rotary"], group).float()
        if not ctx["cfg"]:
            return out
        cond, uncond = out.chunk(2)
        return uncond + ctx["guidance_scale"] * (cond - uncond)

    def decode(self, latents_full: torch.Tensor, request) -> torch.Tensor:
        """uint8 [1, F, H, W, 3] on CPU (WanPipeline: unpack, x std + mean, VAE decode)."""
        self.require("vae")
        cfg = self.vae.config
        with torch.no_grad():
            lat = self.unpack_latents(latents_full.to(device=self.device, dtype=torch.float32), request)
            mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(cfg.latents_std, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
            lat = lat / inv_std + mean
            video = self.vae.decode(lat.to(self._vae_dtype()), return_dict=False)[0]  # [1, 3, F, H, W]
        b, c, f, h, w = video.shape
        frames = to_uint8(video.transpose(1, 2).reshape(b * f, c, h, w))
        return frames.reshape(b, f, h, w, c)
