"""KV-delta (Custom Diffusion): K = context (W + Δ)ᵀ, with one Δ per sample chosen by `index`.

Design. The projections are tiny (77 tokens × 768 → 320..1280); what matters is not materialising the
unfused form's two output-sized results (context Wᵀ and context Δᵀ) and their adds, and serving several
concepts in one batch. The fused path merges the weight once per call, W' = W + Δ (Cout×Cin, or
(E, Cout, Cin) for E concepts), and runs one batched GEMM against W'[index]. Backward:
d context = dK W'[index] (one batched GEMM); dΔ_e = Σ_{b: index_b = e} dK_bᵀ context_b (one batched GEMM
and an index_add); dW = Σ_b dK_bᵀ context_b if W requires grad.
The Triton path (_kv_delta_triton.py) never writes the merged weights: it adds the W and Δ[index[b]]
tiles in registers inside a batched GEMM, for the forward and for d context; dΔ, dW use torch. Shapes: context (B, Nk, Cin), weight (Cout, Cin), delta (Cout, Cin)
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


def _gemm_triton(x, w, delta, index):
    """x (B, M, K) (W + Δ[index])ᵀ, with w (N, K) and delta (E, N, K) possibly transposed views."""
    from . import _kv_delta_triton  # noqa: F401  (registers t2i_fast::kv_delta_gemm)

    return torch.ops.t2i_fast.kv_delta_gemm(x, w, delta, index)


def _as_stack(delta, index, batch):
    """A 2-D delta as a (1, Cout, Cin) stack with index zeros (no copy)."""
    if delta.dim() == 3:
        return delta, index
    return delta.unsqueeze(0), torch.zeros(batch, dtype=torch.long, device=delta.device)


class _KVDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context, weight, delta, index, use_triton):
        ctx.use_triton = use_triton
        if use_triton:
            d3, idx = _as_stack(delta, index, context.shape[0])
            ctx.save_for_backward(context, weight, delta, index)
            return _gemm_triton(context, weight, d3, idx)
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
        if need_c and ctx.use_triton:
            d3, idx = _as_stack(delta, index, context.shape[0])
            dcontext = _gemm_triton(dout, weight.t(), d3.transpose(1, 2), idx)
        elif need_c:
            if index is None:
                dcontext = torch.matmul(dout, weight + delta)
            else:
                dcontext = torch.bmm(dout, delta.index_select(0, index).add_(weight))
        if need_w or need_d:
            if index is None:
                g = torch.mm(dout.reshape(-1, dout.shape[-1]).t(), context.reshape(-1, context.shape[-1]))
                ddelta = g if need_d else None
                dweight = (g.clone() if need_d else g) if need_w else None  # never one buffer for two grads
            else:
                per = torch.bmm(dout.transpose(1, 2), context)                     # (B, Cout, Cin)
                if need_d:
                    ddelta = torch.zeros_like(delta).index_add_(0, index, per.to(delta.dtype))
                if need_w:
                    dweight = per.sum(0)
        return dcontext, dweight, ddelta, None, None


def kv_delta(context, weight, delta, index=None):
    """Fused KV-delta projection; see the module docstring for shapes. Differentiable in context, weight, delta."""
    if delta.dim() == 3 and index is None:
        raise ValueError("kv_delta: a stacked delta (E, Cout, Cin) needs index (B,) choosing one per sample")
    be = _dispatch.backend(context, weight, delta)
    if be == _dispatch.REF:
        return kv_delta_ref(context, weight, delta, index)
    if delta.dim() == 3:
        index = index.to(device=context.device, dtype=torch.long)
    else:
        index = None
    return _KVDelta.apply(context, weight, delta, index, be == _dispatch.TRITON)
