"""Qwen-Image (MMDiT, images): QwenImageTransformer2DModel + AutoencoderKLQwenImage + the Qwen2.5-VL language
model as text encoder, following diffusers' QwenImagePipeline: the prompt wrapped in the pipeline's chat
template and the template's prefix dropped from the hidden states, dynamic exponential flow shift from
the image's token count, packed 2x2 latent patches, and true classifier-free guidance: two transformer
passes (prompt and negative prompt) combined as uncond + g * (cond - uncond), then rescaled per token to
the conditional prediction's norm.

Guidance mapping (the HTTP API's fields reach the model unchanged through gfdit.request.Request):
`guidance_scale` is the pipeline's `true_cfg_scale` and `negative_prompt` its negative prompt. CFG runs
when guidance_scale > 1. QwenImagePipeline also needs a negative prompt to run CFG; here a request
without one uses " ", the negative prompt the Qwen-Image model card recommends when there is nothing to
remove, so that the cost of a request depends on its guidance scale only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

from gfdit.models.base import DiTModel, to_uint8
from gfdit.models.flux import flux_shift
from gfdit.models.sp import install_qwen_processors
from gfdit.models.tokenizer import HFTokenizer

__all__ = ["QwenImageModel", "kPromptTemplate", "kDefaultNegativePrompt"]

# QwenImagePipeline's prompt_template_encode; the hidden states of its prefix (the text before "{}") are
# dropped. With the real Qwen2 tokenizer that prefix is 34 tokens (the pipeline's
# prompt_template_encode_start_idx, used as is); the offline hash tokenizer counts its own.
kPromptTemplate = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
kTemplateDropTokens = 34
kDefaultNegativePrompt = " "


class QwenImageModel(DiTModel):
    family = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    transformer_class = QwenImageTransformer2DModel
    vae_class = AutoencoderKLQwenImage

    def _install_processors(self) -> None:
        install_qwen_processors(self.transformer)

    def uses_cfg(self, request) -> bool:
        return request.guidance_scale > 1.0

    def _drop_tokens(self, tok) -> int:
        if isinstance(tok, HFTokenizer):
            return kTemplateDropTokens
        return len(tok.word_ids(kPromptTemplate.split("{}")[0]))

    def encode(self, request) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": [1, T, hidden]} and, when guidance_scale > 1, "negative_prompt_embeds"
        [1, T', hidden] (of negative_prompt, " " if None): the text encoder's last hidden states of the
        templated prompt without the template's prefix, at most max_length tokens, unpadded (so T varies
        with the prompt, as in QwenImagePipeline for one prompt, which then passes no mask)."""
        self.require("text")
        spec = self.preset.sequence_encoder
        tok, enc = self.tokenizers[spec.subfolder], self.text_encoders[spec.subfolder]
        drop = self._drop_tokens(tok)

        def embed(text: str) -> torch.Tensor:
            ids, mask = tok.encode([kPromptTemplate.format(text)], spec.max_length + drop)
            n = int(mask.sum())  # one prompt: its tokens then padding; the pipeline pads nothing
            ids, mask = ids[:, :n].to(self.device), mask[:, :n].to(self.device)
            hidden = enc(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            return hidden[:, drop:][:, : spec.max_length].to(self.dtype)

        with torch.no_grad():
            cond = {"prompt_embeds": embed(request.prompt)}
            if self.uses_cfg(request):
                neg = (
                    request.negative_prompt if request.negative_prompt is not None else kDefaultNegativePrompt
                )
                cond["negative_prompt_embeds"] = embed(neg)
        return cond

    def timesteps(self, request) -> FlowMatchEulerDiscreteScheduler:
        cfg = self.preset.scheduler_config
        scheduler = FlowMatchEulerDiscreteScheduler(**dict(cfg))
        n = request.num_inference_steps
        # QwenImagePipeline's calculate_shift is Flux's (linear in the token count).
        mu = flux_shift(
            self.seq_len(request),
            cfg["base_image_seq_len"],
            cfg["max_image_seq_len"],
            cfg["base_shift"],
            cfg["max_shift"],
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device=self.device)
        return scheduler

    def _prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        cfg = self.uses_cfg(request)
        _, h, w = self.token_grid(request)
        ctx = {
            "prompt_embeds": self._cond(cond, "prompt_embeds"),
            "cfg": cfg,
            "guidance_scale": float(request.guidance_scale),
            # The FULL grid: RoPE is applied to all S tokens after the all-to-all (QwenSPAttnProcessor).
            "img_shapes": [[(1, h, w)]],
            "attention_kwargs": None if group is None else {"sp_group": group},
        }
        if cfg:
            ctx["negative_prompt_embeds"] = self._cond(cond, "negative_prompt_embeds")
        return ctx

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(self.dtype) / 1000
        hidden = x.to(self.dtype)

        def predict(embeds: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=None,
                img_shapes=ctx["img_shapes"],
                attention_kwargs=ctx["attention_kwargs"],
                return_dict=False,
            )[0].float()

        if ctx.get("cfg_pair") is not None:  # CFG-parallel: this rank's branch (Note [CFG-parallel])
            branch = ctx["cfg_pair"].rank
            cond, uncond = self.cfg_exchange(
                predict(ctx["prompt_embeds"] if branch == 0 else ctx["negative_prompt_embeds"]), ctx
            )
        else:
            cond = predict(ctx["prompt_embeds"])
            if not ctx["cfg"]:
                return cond
            uncond = predict(ctx["negative_prompt_embeds"])
        guided = uncond + ctx["guidance_scale"] * (cond - uncond)
        # Per-token norm over channels: local to each token, so the same on any SP split.
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def decode(self, latents_full: torch.Tensor, request) -> torch.Tensor:
        """uint8 [1, H, W, 3] on CPU (QwenImagePipeline: unpack to [1, C, 1, h, w], x std + mean, VAE
        decode, first frame)."""
        self.require("vae")
        cfg = self.vae.config
        with torch.no_grad():
            lat = self.unpack_latents(latents_full.to(device=self.device, dtype=torch.float32), request)
            lat = lat.unsqueeze(2)
            mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(cfg.latents_std, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
            lat = lat / inv_std + mean
            image = self.vae.decode(lat.to(self._vae_dtype()), return_dict=False)[0][:, :, 0]
        return to_uint8(image)
