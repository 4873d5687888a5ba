"""KV-delta (Custom Diffusion): K = context (W + Δ)ᵀ, with one Δ per sample chosen by `index`.

Design. The projections are tiny (77 tokens × 768 → 320..1280); what matters is not materialising the
unfused form's two output-sized results (context Wᵀ and context Δᵀ) and their adds, and serving several
concepts in one batch. The fused path merges the weight once per call, W' = W + Δ (Cout×Cin, or
(E, Cout, Cin) for E concepts), and runs one batched GEMM against W'[index]. Backward:
d context = dK W'[index] (one batched GEMM); dΔ_e = Σ_{b: index_b = e} dK_bᵀ context_b (one batched GEMM
and an index_add); dW = Σ_b dK_bᵀ context_b if W requires grad.
Triton is not used: at these sizes the op is a handful of cuBLAS GEMMs; the Triton path is this same
PyTorch path (documented, not hidden). Shapes: context (B, Nk, Cin), weight (Cout, Cin), delta (Cout, Cin)
or (E, Cout, Cin) with index (B,) long -> (B, Nk, Cout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch


def kv_delta_ref(context, weight, delta, index=None):
    """Plain twin: context Wᵀ + context Δ[index]ᵀ, computed unfused."""
    base = F.linear(context, weight)
    if delta.dim() == 2:
        return base + F.linear(context, delta)
    if index is None:
        raise ValueError("kv_delta: a stacked delta (E, Cout, Cin) needs index (B,)")
    return base + torch.einsum("bnc,boc->bno", context, delta[index])


class _KVDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context, weight, delta, index):
        if index is None:                                                          # one shared delta
            w_eff = weight + delta                                                 # (Cout, Cin)
            out = torch.matmul(context, w_eff.t())                                 # (B, Nk, Cout)
        else:
            w_eff = delta.index_select(0, index).add_(weight)                     # (B, Cout, Cin)
            out = torch.bmm(context, w_eff.transpose(1, 2))
        ctx.save_for_backward(context, weight, delta, index)
        return out

    @staticmethod
    def backward(ctx, dout):
        # d context = dK W'[index];  dΔ_e = Σ_{b: index_b = e} dK_bᵀ context_b;  dW = Σ_b dK_bᵀ context_b
        context, weight, delta, index = ctx.saved_tensors
        need_c, need_w, need_d = ctx.needs_input_grad[:3]
        dcontext = dweight = ddelta = None
        if need_c:
            if index is None:
                dcontext = torch.matmul(dout, weight + delta)
            else:
                dcontext = torch.bmm(dout, delta.index_select(0, index).add_(weight))
        if need_w or need_d:
            if index is None:
                g = torch.mm(dout.reshape(-1, dout.shape[-1]).t(), context.reshape(-1, context.shape[-1]))
                dweight, ddelta = (g if need_w else None), (g if need_d else None)
            else:
                per = torch.bmm(dout.transpose(1, 2), context)                     # (B, Cout, Cin)
                if need_d:
                    ddelta = torch.zeros_like(delta).index_add_(0, index, per.to(delta.dtype))
                if need_w:
                    dweight = per.sum(0)
        return dcontext, dweight, ddelta, None


def kv_delta(context, weight, delta, index=None):
    """Fused KV-delta projection; see the module docstring for shapes. Differentiable in context, weight, delta."""
    if delta.dim() == 3 and index is None:
        raise ValueError("kv_delta: a stacked delta (E, Cout, Cin) needs index (B,) choosing one per sample")
    if _dispatch.backend(context, weight, delta) == _dispatch.REF:
        return kv_delta_ref(context, weight, delta, index)
    if delta.dim() == 3:
        index = index.to(device=context.device, dtype=torch.long)
    return _KVDelta.apply(context, weight, delta, index)
