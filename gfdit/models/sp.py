"""Ulysses sequence parallelism for the diffusers Flux, Wan and Qwen-Image transformers, over a group given
per call.

Note [Ulysses over a gfcoll group]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A group of d ranks runs one forward together. Member i (its `group.rank`) holds slice i of an even split
of the S image/video tokens (S % d == 0) and all T text tokens (replicated). Everything outside attention
is per token and runs on the local slice unchanged. In each self-attention:
  1. q, k, v of the local image tokens are projected (and q/k-normed) with all H heads, then ONE
     all_to_all over the stacked [3, ...] tensor turns "S/d tokens x H heads" into "S tokens x H/d heads"
     (member j receives head block j; the received blocks are in member order, i.e. in token order).
  2. Text q, k, v (Flux joint attention) are computed by every member; each keeps its head block only.
  3. RoPE is applied to the FULL sequence [text; image] with the rotary table of the full token grid,
     then attention runs on this member's H/d heads: the same per-head math as one rank.
  4. The inverse all_to_all returns the image tokens' output for all heads to their owner; the text
     output is all_gathered over heads, so every member ends with the full text stream, bit-identical
     on every member, as on one rank.
The heads must divide by d as well. Every member of the group must call the forward with the same
inputs apart from its slice (the same step, text, timestep), in the same order: the collectives of
one forward are issued in layer order (gfcoll ordering rule 1). Buffers handed to gfcoll are
contiguous. With group None or of size 1 the processors are exactly the diffusers ones.
The batch dimension B rides along unchanged (every exchanged block is [.., B, tokens, heads, D]): Wan's
CFG rows and batched requests (Note [Batched steps] in gfdit/models/batch.py) use B > 1.

The group reaches the processors per call, never through global state: Flux through
`joint_attention_kwargs={"sp_group": g, "sp_text_len": T}` (FluxAttention filters kwargs by the
processor's signature); Wan's transformer does not forward attention kwargs to its blocks, so
`wan_forward` mirrors WanTransformer3DModel.forward / WanTransformerBlock.forward (Wan 2.1 text-to-video:
no image conditioning, one timestep per sample) and passes the group to the self-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as _flux_qkv
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as _wan_qkv

# _flux_qkv / _wan_qkv are private helpers of the pinned diffusers (MIN_DIFFUSERS_VERSION); the processors
# use them so that fused projections (fuse_qkv_projections) work as in the diffusers processors.

__all__ = [
    "FluxSPAttnProcessor",
    "WanSPAttnProcessor",
    "install_flux_processors",
    "install_wan_processors",
    "QwenSPAttnProcessor",
    "install_qwen_processors",
    "seq_to_heads",
    "heads_to_seq",
    "gather_heads",
    "head_slice",
    "wan_forward",
    "wan_block",
]


def _is_parallel(group) -> bool:
    return group is not None and group.size > 1


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[N, B, S/d, H, D] sharded over tokens -> [N, B, S, H/d, D] (this member's head block, all tokens).
    All members call it together."""
    d = group.size
    n, b, s, h, hd = x.shape
    if h % d:
        raise ValueError(f"{h} heads do not split over a group of {d}")
    send = x.reshape(n, b, s, d, h // d, hd).permute(3, 0, 1, 2, 4, 5).contiguous()  # [d, N, B, s, H/d, D]
    recv = torch.empty_like(send)
    group.all_to_all(recv, send)  # recv[j]: member j's tokens (slice j), my head block
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, d * s, h // d, hd)


def heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads for one tensor: [B, S, H/d, D] -> [B, S/d, H, D] (my tokens, all heads)."""
    d = group.size
    b, s_full, hb, hd = y.shape
    s = s_full // d
    send = y.reshape(b, d, s, hb, hd).transpose(0, 1).contiguous()  # [d, B, s, H/d, D]: block j -> member j
    recv = torch.empty_like(send)
    group.all_to_all(recv, send)  # recv[j]: my tokens, member j's head block
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, d * hb, hd)


def gather_heads(y: torch.Tensor, group) -> torch.Tensor:
    """[B, T, H/d, D] (my head block) -> [B, T, H, D] (every member's blocks in member order)."""
    d = group.size
    b, t, hb, hd = y.shape
    send = y.permute(2, 0, 1, 3).contiguous()  # [H/d, B, T, D]: heads on dim 0 for all_gather
    out = torch.empty((d * hb, b, t, hd), dtype=y.dtype, device=y.device)
    group.all_gather(out, send)
    return out.permute(1, 2, 0, 3)


def head_slice(x: torch.Tensor, group, dim: int = -2) -> torch.Tensor:
    """This member's head block of x along `dim` (heads split evenly in member order)."""
    h = x.shape[dim]
    hb = h // group.size
    return x.narrow(dim, group.rank * hb, hb)


class FluxSPAttnProcessor(FluxAttnProcessor):
    """FluxAttnProcessor with Ulysses SP over `sp_group` (Note [Ulysses over a gfcoll group]).

    Double-stream blocks pass the text stream as `encoder_hidden_states`; single-stream blocks pass
    [text; image] concatenated, whose first `sp_text_len` tokens are the text. `image_rotary_emb` must be
    the table of the FULL sequence (text ids + the image ids of all S tokens)."""

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sp_group=None,
        sp_text_len: int | None = None,
    ):
        if not _is_parallel(sp_group):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if attention_mask is not None:
            raise NotImplementedError("sequence-parallel Flux attention takes no attention_mask")
        joint = encoder_hidden_states is not None
        q, k, v, eq, ek, ev = _flux_qkv(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        if joint:
            t_len = encoder_hidden_states.shape[1]
            tq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            tv = ev.unflatten(-1, (-1, attn.head_dim))
            img = torch.stack([q, k, v])
            txt = torch.stack([tq, tk, tv])
        else:
            if sp_text_len is None:
                raise ValueError("single-stream Flux attention under SP needs sp_text_len")
            t_len = sp_text_len
            qkv = torch.stack([q, k, v])  # [3, B, T + S/d, H, D]
            txt, img = qkv[:, :, :t_len], qkv[:, :, t_len:]
        img = seq_to_heads(img, sp_group)  # [3, B, S, H/d, D]
        txt = head_slice(txt, sp_group)  # [3, B, T, H/d, D]
        q, k, v = torch.cat([txt, img], dim=2).unbind(0)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=self._attention_backend)
        out = out.to(q.dtype)
        txt_out = gather_heads(out[:, :t_len], sp_group).flatten(2, 3)
        img_out = heads_to_seq(out[:, t_len:], sp_group).flatten(2, 3)
        if joint:
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            txt_out = attn.to_add_out(txt_out.contiguous())
            return img_out, txt_out
        return torch.cat([txt_out, img_out], dim=1)


class WanSPAttnProcessor(WanAttnProcessor):
    """WanAttnProcessor with Ulysses SP over `sp_group` for self-attention (Note [Ulysses over a gfcoll
    group]). `rotary_emb` is the (cos, sin) table [1, S, 1, D] of the FULL token grid. Cross-attention
    (encoder_hidden_states given) needs no communication: local queries, replicated text keys/values."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sp_group=None,
    ) -> torch.Tensor:
        if not _is_parallel(sp_group) or encoder_hidden_states is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("sequence-parallel Wan attention takes no attention_mask")
        q, k, v = _wan_qkv(attn, hidden_states, None)
        q = attn.norm_q(q)  # RMS norm across all heads of a token: before the exchange
        k = attn.norm_k(k)
        qkv = torch.stack([t.unflatten(2, (attn.heads, -1)) for t in (q, k, v)])
        q, k, v = seq_to_heads(qkv, sp_group).unbind(0)  # [B, S, H/d, D]
        if rotary_emb is not None:
            # The same interleaved-pair rotation as WanAttnProcessor's (cos/sin repeat-interleaved).
            table = (rotary_emb[0][0, :, 0], rotary_emb[1][0, :, 0])
            q = apply_rotary_emb(q, table, sequence_dim=1)
            k = apply_rotary_emb(k, table, sequence_dim=1)
        out = dispatch_attention_fn(
            q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        out = heads_to_seq(out.type_as(q), sp_group).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def install_flux_processors(transformer) -> None:
    """Every attention of a FluxTransformer2DModel gets a FluxSPAttnProcessor."""
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(FluxSPAttnProcessor())


def install_wan_processors(transformer) -> None:
    """The self-attention of every Wan block gets a WanSPAttnProcessor (cross-attention keeps its own)."""
    for block in transformer.blocks:
        block.attn1.set_processor(WanSPAttnProcessor())


def wan_rotary(transformer, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary table [1, S, 1, D] of the full token grid (frames, rows, columns)."""
    pt, ph, pw = transformer.config.patch_size
    f, h, w = grid
    # WanRotaryPosEmbed reads only the shape of its input: an empty tensor of the latent's shape.
    return transformer.rope(torch.empty((1, 0, f * pt, h * ph, w * pw), device=device))


def wan_block(block, x, context, temb, rotary, group):
    """WanTransformerBlock.forward for a [B, 6, dim] timestep projection, with the group passed to the
    self-attention."""
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(
        6, dim=1
    )
    norm = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
    attn = block.attn1(norm, None, None, rotary, sp_group=group)
    x = (x.float() + attn * gate_msa).type_as(x)
    norm = block.norm2(x.float()).type_as(x)
    x = x + block.attn2(norm, context, None, None)
    norm = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    ff = block.ffn(norm)
    return (x.float() + ff.float() * c_gate).type_as(x)


def wan_forward(
    transformer,
    tokens: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    grid: tuple[int, int, int],
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    group=None,
) -> torch.Tensor:
    """WanTransformer3DModel.forward on packed tokens (Note [Packed tokens] in presets.py).

    tokens: [B, S/d, C*pt*ph*pw] this member's slice; timestep [B]; encoder_hidden_states [B, L, text_dim]
    (replicated); grid: the full (frames, rows, columns) token grid; rotary: wan_rotary(...) if already
    computed. Returns the flow prediction for the slice in the same packed layout."""
    cfg = transformer.config
    if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
        raise NotImplementedError("image-conditioned Wan models are not supported")
    if rotary is None:
        rotary = wan_rotary(transformer, grid, tokens.device)
    # Conv3d with kernel == stride is a Linear over packed patches in (c, pt, ph, pw) order.
    conv = transformer.patch_embedding
    x = F.linear(tokens, conv.weight.flatten(1), conv.bias).contiguous()
    if timestep.ndim != 1:
        raise ValueError("wan_forward takes one timestep per sample")
    temb, timestep_proj, context, _ = transformer.condition_embedder(timestep, encoder_hidden_states, None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    # A compiled wan_block when gfdit.models.compile set one (Note [Compiled steps]).
    block_fn = getattr(transformer, "gfdit_block_fn", wan_block)
    for block in transformer.blocks:
        x = block_fn(block, x, context, timestep_proj, rotary, group)
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (transformer.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    x = transformer.proj_out(x)  # channels in (pt, ph, pw, c) order
    patch = math.prod(cfg.patch_size)
    return x.unflatten(-1, (patch, -1)).transpose(-1, -2).flatten(2)


# -- Qwen-Image ---------------------------------------------------------------------------------------------


class QwenSPAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """QwenDoubleStreamAttnProcessor2_0 with Ulysses SP over `sp_group` (Note [Ulysses over a gfcoll group]),
    the text stream handled as in Flux's double-stream blocks: every member projects all T text tokens and
    keeps its head block; the text output is gathered over heads.

    `image_rotary_emb` is (image freqs, text freqs) as QwenEmbedRope gives them for the FULL token grid: the
    transformer's forward computes it from `img_shapes`, which name the full grid however many tokens this
    member holds. The group arrives through the transformer's `attention_kwargs={"sp_group": g}` (Attention
    filters the kwargs by this signature). No text mask under SP: a single prompt's embeddings are unpadded
    (QwenImagePipeline passes no mask then either)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sp_group=None,
    ):
        if not _is_parallel(sp_group):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                image_rotary_emb,
            )  # fmt: skip
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs the text stream (encoder_hidden_states)")
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise NotImplementedError(
                "sequence-parallel Qwen-Image attention takes no text or attention mask"
            )
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:  # RMS norm per head: before the exchange, as on one rank
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        t_len = encoder_hidden_states.shape[1]
        q, k, v = seq_to_heads(torch.stack([q, k, v]), sp_group).unbind(0)  # [B, S, H/d, D]
        tq, tk, tv = head_slice(torch.stack([tq, tk, tv]), sp_group).unbind(0)  # [B, T, H/d, D]
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        out = dispatch_attention_fn(
            torch.cat([tq, q], dim=1),  # [text; image], as QwenDoubleStreamAttnProcessor2_0
            torch.cat([tk, k], dim=1),
            torch.cat([tv, v], dim=1),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
        ).to(q.dtype)
        txt_out = gather_heads(out[:, :t_len], sp_group).flatten(2, 3)
        img_out = heads_to_seq(out[:, t_len:], sp_group).flatten(2, 3)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout (identity in eval)
        return img_out, attn.to_add_out(txt_out.contiguous())


def install_qwen_processors(transformer) -> None:
    """Every block of a QwenImageTransformer2DModel gets a QwenSPAttnProcessor."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(QwenSPAttnProcessor())
