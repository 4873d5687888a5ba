"""Attention processors for diffusers' `Attention` that run t2i_fast.kernels.attention.

- FastAttnProcessor: drop-in for diffusers' AttnProcessor2_0 (self- and cross-attention; group/spatial
  norm, norm_q/norm_k, residual and rescale handled the same way). With an attention mask it falls back
  to torch SDPA (the kernel has no mask).
- FastCustomDiffusionAttnProcessor: a subclass of diffusers' CustomDiffusionAttnProcessor, so parameter
  names, state_dict keys and diffusers' save/load code (isinstance checks) are unchanged; only the
  attention itself runs through kernels.attention. For cross-attention the K/V of the first
  (start-of-text) token are detached, as in diffusers.
- set_fast_attention(unet, enabled): install / remove FastAttnProcessor on every Attention module,
  leaving Custom Diffusion processors alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
)

from t2i_fast.kernels import attention as _attention

CUSTOM_DIFFUSION_PROCESSORS = (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0)


def tokens_in(attn: Attention, hidden_states, temb, attention_mask, encoder_hidden_states=None):
    """AttnProcessor2_0's preamble: spatial norm, (B, C, H, W) -> (B, H·W, C), the mask as (B, heads, Nq, Nk),
    group norm. Returns (hidden_states, attention_mask, the image shape to restore or None)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
    if image_shape is not None:
        batch, channel, height, width = image_shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, attention_mask, image_shape


def tokens_out(attn: Attention, out, residual, image_shape):
    """AttnProcessor2_0's tail after to_out[0]: dropout, back to image_shape, residual, rescale."""
    out = attn.to_out[1](out)
    if image_shape is not None:
        out = out.transpose(-1, -2).reshape(image_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·D) -> (B, H, N, D) view."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def attend(q, k, v, mask, scale=None) -> torch.Tensor:
    """q (B, H, Nq, D), k, v (B, H, Nk, D), mask None or additive (B, H, Nq, Nk) -> (B, Nq, H·D) in q's dtype;
    scale None means D**-0.5 (AttnProcessor2_0's SDPA default)."""
    B, H, Nq, D = q.shape
    if mask is None:
        o = _attention(q, k, v, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(B, Nq, H * D).to(q.dtype)


class FastAttnProcessor:
    """AttnProcessor2_0 with the attention computed by t2i_fast.kernels.attention."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        hidden_states, attention_mask, image_shape = tokens_in(attn, hidden_states, temb, attention_mask,
                                                               encoder_hidden_states)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query, key, value = (heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # AttnProcessor2_0 calls SDPA with its default scale D**-0.5 (not attn.scale): so do we
        hidden_states = attend(query, key, value, attention_mask, None)

        return tokens_out(attn, attn.to_out[0](hidden_states), residual, image_shape)


def _detach_first_token(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C): the first token's row carries no gradient (Custom Diffusion's start-token detach)."""
    return torch.cat([x[:, :1].detach(), x[:, 1:]], dim=1)


class FastCustomDiffusionAttnProcessor(CustomDiffusionAttnProcessor):
    """diffusers' CustomDiffusionAttnProcessor (same parameters and keys) with fused attention.

    Parameters: to_k_custom_diffusion.weight, to_v_custom_diffusion.weight (train_kv),
    to_q_custom_diffusion.weight, to_out_custom_diffusion.0.weight/.bias (train_q_out).
    """

    def __init__(self, train_kv: bool = True, train_q_out: bool = False, hidden_size: int | None = None,
                 cross_attention_dim: int | None = None, out_bias: bool = True, dropout: float = 0.0):
        super().__init__(train_kv=train_kv, train_q_out=train_q_out, hidden_size=hidden_size,
                         cross_attention_dim=cross_attention_dim, out_bias=out_bias, dropout=dropout)

    @classmethod
    def from_diffusers(cls, proc: torch.nn.Module) -> "FastCustomDiffusionAttnProcessor":
        """A processor sharing `proc`'s submodules (the same Parameter objects: no copy)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.train_kv, new.train_q_out = proc.train_kv, proc.train_q_out
        new.hidden_size, new.cross_attention_dim = proc.hidden_size, proc.cross_attention_dim
        for name, child in proc.named_children():
            new.add_module(name, child)
        return new

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        dtype = attn.to_q.weight.dtype
        if self.train_q_out:
            query = self.to_q_custom_diffusion(hidden_states.to(self.to_q_custom_diffusion.weight.dtype)).to(dtype)
        else:
            query = attn.to_q(hidden_states.to(dtype))
        crossattn = encoder_hidden_states is not None
        if not crossattn:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if self.train_kv:
            wdtype = self.to_k_custom_diffusion.weight.dtype
            key = self.to_k_custom_diffusion(encoder_hidden_states.to(wdtype)).to(dtype)
            value = self.to_v_custom_diffusion(encoder_hidden_states.to(wdtype)).to(dtype)
        else:
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        if crossattn:
            key, value = _detach_first_token(key), _detach_first_token(value)

        query, key, value = (heads(t, attn.heads) for t in (query, key, value))
        hidden_states = attend(query, key, value, attention_mask, attn.scale)  # get_attention_scores uses attn.scale
        out = self.to_out_custom_diffusion if self.train_q_out else attn.to_out
        return out[1](out[0](hidden_states))


def _is_custom_diffusion(proc) -> bool:
    return isinstance(proc, CUSTOM_DIFFUSION_PROCESSORS)


def set_fast_attention(unet: torch.nn.Module, enabled: bool = True) -> int:
    """Install (enabled) or remove FastAttnProcessor on every diffusers Attention in `unet`; Custom
    Diffusion processors are kept as they are. Returns the number of modules changed."""
    changed = 0
    for module in unet.modules():
        if not isinstance(module, Attention) or _is_custom_diffusion(module.processor):
            continue
        if enabled and isinstance(module.processor, (AttnProcessor, AttnProcessor2_0)):
            module.set_processor(FastAttnProcessor())
            changed += 1
        elif not enabled and isinstance(module.processor, FastAttnProcessor):
            module.set_processor(AttnProcessor2_0())
            changed += 1
    return changed
