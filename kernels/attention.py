"""Attention: O = softmax(Q Kᵀ · scale) V, non-causal, no mask, with a fused (flash-style) backward.

Design. Two fused paths share one algebra (FlashAttention-2): the forward keeps only O and the row
log-sum-exp L; the backward recomputes P = exp(Q Kᵀ · scale − L) tile by tile, with
delta = rowsum(O ∘ dO), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − delta), dQ = scale · dS K,
dK = scale · dSᵀ Q. No Nq×Nk matrix is ever held in memory:
  - Triton (CUDA, or CPU under TRITON_INTERPRET=1): _attention_triton.py, tiles of BLOCK_M×BLOCK_N,
    head dims split into two power-of-two pieces (40 = 32+16 masked, 80 = 64+16, 160 = 128+32).
  - PyTorch (everywhere else): on the CPU, ATen's fused flash kernels
    (aten::_scaled_dot_product_flash_attention_for_cpu and its backward: the same algebra, tiled, with
    fp32 statistics, and much faster than composing the algebra from separate ops on a CPU);
    on other devices, the same algebra composed from torch ops on query chunks of at most CHUNK_ELEMS
    scores at a time.
Inputs are fp32/fp16/bf16; softmax statistics and accumulation are fp32 in both paths.
Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D) -> (B, H, Nq, D); any D <= 256, any Nq, Nk >= 1.
"""
from __future__ import annotations

import torch

from . import _dispatch

CHUNK_ELEMS = 1 << 21  # scores held at once by the PyTorch path (8 MiB fp32 per temporary)


def attention_ref(q, k, v, scale=None):
    """Plain twin: materialises the Nq×Nk scores. q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _chunks(q: torch.Tensor, nk: int):
    B, H, Nq, _ = q.shape
    step = max(1, min(Nq, CHUNK_ELEMS // max(1, B * H * nk)))
    return [(i, min(Nq, i + step)) for i in range(0, Nq, step)]


# the meta device (the memory planner's trace) takes the CPU kernel too: its meta version allocates what the
# kernel does (o and lse), as the Triton kernel does on CUDA
_FLASH_DEVICES = ("cpu", "meta")


def _fwd_torch(q, k, v, scale):
    if q.device.type in _FLASH_DEVICES:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return _fwd_chunked(q, k, v, scale)


def _bwd_torch(do, q, k, v, o, lse, scale):
    if q.device.type in _FLASH_DEVICES:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, False, scale=scale)
    return _bwd_chunked(do, q, k, v, o, lse, scale)


def _fwd_chunked(q, k, v, scale):
    """-> o (B, H, Nq, D) in q's dtype, laid out as (B, Nq, H, D); lse (B, H, Nq) fp32, natural log."""
    B, H, Nq, D = q.shape
    kf, vf = k.float(), v.float()
    o = torch.empty((B, Nq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    for i, j in _chunks(q, k.shape[2]):
        s = torch.matmul(q[:, :, i:j].float(), kf.transpose(-1, -2)).mul_(scale)       # (B, H, c, Nk)
        l_c = torch.logsumexp(s, dim=-1)                                                 # (B, H, c)
        p = s.sub_(l_c.unsqueeze(-1)).exp_()
        o[:, :, i:j] = torch.matmul(p, vf)
        lse[:, :, i:j] = l_c
    return o, lse


def _bwd_chunked(do, q, k, v, o, lse, scale):
    kf, vf = k.float(), v.float()
    delta = (o.float() * do.float()).sum(-1)                                             # (B, H, Nq)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    for i, j in _chunks(q, k.shape[2]):
        qc, doc = q[:, :, i:j].float(), do[:, :, i:j].float()                           # (B, H, c, D)
        p = torch.matmul(qc, kf.transpose(-1, -2)).mul_(scale).sub_(lse[:, :, i:j, None]).exp_()  # (B, H, c, Nk)
        dv.add_(torch.matmul(p.transpose(-1, -2), doc))
        ds = torch.matmul(doc, vf.transpose(-1, -2)).sub_(delta[:, :, i:j, None]).mul_(p)        # dS = P∘(dP−delta)
        dq[:, :, i:j] = torch.matmul(ds, kf).mul_(scale)
        dk.add_(torch.matmul(ds.transpose(-1, -2), qc), alpha=scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _fwd_triton(q, k, v, scale):
    from . import _attention_triton  # noqa: F401  (registers t2i_fast::flash_attn_*)

    return torch.ops.t2i_fast.flash_attn_fwd(q, k, v, scale)


def _bwd_triton(do, q, k, v, o, lse, scale):
    from . import _attention_triton  # noqa: F401

    return torch.ops.t2i_fast.flash_attn_bwd(do, q, k, v, o, lse, scale)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, use_triton):
        o, lse = (_fwd_triton if use_triton else _fwd_torch)(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.use_triton = scale, use_triton
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (_bwd_triton if ctx.use_triton else _bwd_torch)(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, scale=None):
    """Flash attention. q (B, H, Nq, D), k and v (B, H, Nk, D), one dtype (fp32/fp16/bf16), D <= 256;
    scale defaults to D**-0.5 -> (B, H, Nq, D), laid out so that .transpose(1, 2) is contiguous."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention expects q (B, H, Nq, D) and k, v (B, H, Nk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 256:
        raise ValueError(f"attention supports head dims up to 256, got {q.shape[-1]}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    be = _dispatch.backend(q, k, v)
    if be == _dispatch.REF:
        return attention_ref(q, k, v, scale)
    return _Attention.apply(q, k, v, scale, be == _dispatch.TRITON)
