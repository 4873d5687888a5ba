"""LoRA linear: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ with W frozen.

Design. The unfused form reads x twice and makes three output-sized passes (x Wᵀ, the low-rank product,
the add); its autograd backward adds more. Here, with m = M rows:
  forward   W' = W + s·B·A (out×in, tiny next to m×in), y = x W'ᵀ + b in one GEMM, and xa = x Aᵀ (m×r)
            saved for the backward; on Triton xa comes out of the same GEMM (first column of tiles), on the
            CPU path out of the same loop over row chunks (each chunk of x is still in cache for x Aᵀ).
  backward  dx = dy W' in one GEMM (with dy·B (m×r) as the same GEMM's side output: same two schemes);
            dB = s · dyᵀ (x Aᵀ) and dA = s · (dy B)ᵀ x: one skinny GEMM each.
Nothing output-sized is materialised beyond y and dy. W and b get gradients only if they require grad.
Limits: W' is rounded to W's dtype, so bf16/fp16 results differ from the unfused form at that rounding
level; the tests bound it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale):
    """Plain twin. x (..., in), weight (out, in), bias (out) or None, lora_a (r, in), lora_b (out, r) -> (..., out)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


# Inputs with fewer elements than this take the twin on the PyTorch (CPU) path: there the custom Function's
# fixed cost (W' rebuilt twice, several GEMMs, a Python backward) outweighs what it saves. Fused/twin time,
# fwd+bwd, 1 thread, rank 4 (bench/bench_lora.py --threads 1 --shapes ..., "fused-always" / "ref"): 1.70 at
# M=64 32->32, 1.57 at 64 64->64, 1.20 at 256 64->64 (16k elements), 0.83 at 1024 64->64 (65k), 0.90 at
# 256 320->320, 0.78 at 4096 320->320. Tests set it to 0 so that the Function itself is checked at every shape.
SMALL_INPUT = 1 << 16
# Inputs with few rows next to the layer's size take the twin there too: the Function builds W' = W + s·B·A
# (out x in, written in the forward and again in the backward), which costs more than the twin's extra passes
# over x and y (rows x (in + out)) once rows < in·out / (in + out). E.g. cross-attention K/V on 77 text tokens,
# 2048 -> 512 on SDXL-shaped models: a whole sdxl-mid LoRA step at 256 px took 1.61 s with the Function there
# and 1.47 s with the twin (one-off timing, 1 thread). FEW_ROWS scales the rule; tests set it to 0 with
# SMALL_INPUT so that the Function runs at every shape.
FEW_ROWS = 1.0

# Row chunks of the torch path: at most this many bytes of x (or dy) each, all of one size, so that a chunk
# is still in cache (L2/L3) when the skinny GEMM rereads it right after the big GEMM that brought it in.
_CHUNK_BYTES = 1 << 20


def _chunk_rows(t):
    """Rows per chunk for t (M, K): equal chunks of at most _CHUNK_BYTES (at least 64 rows)."""
    m = t.shape[0]
    rows = max(64, _CHUNK_BYTES // (t.shape[1] * t.element_size()))
    n_chunks = -(-m // rows)
    return -(-m // n_chunks)


def _gemm_torch(x, w, bias, u):
    """x (M, K), w (N, K), bias (N) or None, u (R, K) -> (x wᵀ + bias (M, N), x uᵀ (M, R)).

    Row chunk by row chunk, so x is read from memory once: measured alone at 1 thread, an x·uᵀ pass over an
    x that a big GEMM has pushed out of cache takes about twice its in-cache time."""
    m, rows = x.shape[0], _chunk_rows(x)
    w_t, u_t = w.t(), u.t()          # transposed views of contiguous (N, K), (R, K): MKL's fast layout
    if m <= rows:
        y = torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
        return y, torch.mm(x, u_t)
    y, xu = x.new_empty(m, w.shape[0]), x.new_empty(m, u.shape[0])
    for i in range(0, m, rows):
        xc = x[i:i + rows]                                                    # (rows, K) view
        if bias is not None:
            torch.addmm(bias, xc, w_t, out=y[i:i + rows])
        else:
            torch.mm(xc, w_t, out=y[i:i + rows])
        torch.mm(xc, u_t, out=xu[i:i + rows])
    return y, xu


def _gemm_triton(x, w, bias, u):
    from . import _lora_triton  # noqa: F401  (registers t2i_fast::lora_gemm)

    return torch.ops.t2i_fast.lora_gemm(x, w, bias, u)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scale, use_triton):
        # x2 (M, in) -> y (M, out)
        gemm = _gemm_triton if use_triton else _gemm_torch
        w_eff = torch.addmm(weight, lora_b, lora_a, alpha=scale)              # (out, in)
        y, xa = gemm(x2, w_eff, bias, lora_a)                                 # (M, out), (M, r)
        # W' is rebuilt in the backward rather than saved: saving it would hold one more out×in tensor per
        # LoRA layer from forward to backward, to save ~2% of the layer's time (measured at 640x640)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.use_triton, ctx.has_bias = scale, use_triton, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        # dx = dy (W + sBA);  dB = s dyᵀ (x Aᵀ);  dA = s (dy B)ᵀ x;  dW = dyᵀ x;  db = Σ_m dy
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        dy = dy.contiguous()
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = da = dbb = None
        # skinny operands are passed as transposed views of contiguous (r, n) matrices: on CPU (MKL/oneDNN)
        # that layout is ~5x faster than (n, r) contiguous for these M×n·n×r products
        b_t = lora_b.t().contiguous()                                         # (r, out)
        if need_x:
            gemm = _gemm_triton if ctx.use_triton else _gemm_torch
            w_eff = torch.addmm(weight, lora_b, lora_a, alpha=s)
            dx, dyb = gemm(dy, w_eff.t(), None, b_t)                           # (M, in), (M, r)
        elif need_a:
            dyb = torch.mm(dy, b_t.t())
        if need_bb:
            dbb = torch.mm(xa.t(), dy).mul_(s).t()                            # (out, r) = s (xaᵀ dy)ᵀ
        if need_a:
            da = torch.mm(dyb.t(), x2).mul_(s)                                # (r, in)
        if need_w:
            dw = torch.mm(dy.t(), x2)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, da, dbb, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """Fused LoRA linear. x (..., in), weight (out, in), bias (out) or None, lora_a (r, in), lora_b (out, r)
    -> (..., out), computed in one dtype (fp32/fp16/bf16): autocast's where autocast is on (as F.linear
    would be), else the weight's. Differentiable in every tensor argument; gradients reach each argument in
    its own dtype."""
    dtype = _dispatch.compute_dtype(x, weight)
    x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
    bias = bias.to(dtype) if bias is not None else None
    with _dispatch.autocast_off(x):  # every operand is cast already; keep them as they are
        return _lora_linear(x, weight, bias, lora_a, lora_b, scale)


def _lora_linear(x, weight, bias, lora_a, lora_b, scale):
    be = _dispatch.backend(x, weight, lora_a, lora_b)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if be == _dispatch.REF or (be == _dispatch.TORCH and (
            x.numel() < SMALL_INPUT or rows * (in_features + out_features) < FEW_ROWS * in_features * out_features)):
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)                                           # (M, in)
    y = _LoRALinear.apply(x2, weight, bias, lora_a, lora_b, float(scale), be == _dispatch.TRITON)
    return y.view(*lead, weight.shape[0])
