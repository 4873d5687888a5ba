"""Triton kernel behind kernels.kv_delta (imported lazily: importing it imports Triton).

Y[b] = X[b] (W + Δ[index[b]])ᵀ with the per-sample weight merged tile by tile in registers: the
(B, Cout, Cin) stack of merged weights is never written. The forward uses it as is; the backward's
d context = dK (W + Δ[index]) is the same kernel with W and Δ read transposed (strides swapped).
dΔ and dW (skinny reductions over 77 tokens) are left to torch. Registered as t2i_fast::kv_delta_gemm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._dispatch import interpret
from ._dispatch import dot_precision as precision


@triton.jit
def _kv_delta_kernel(
    X, W, DELTA, IDX, Y, M, N, K,
    sxb, sxm, sxk, swn, swk, sde, sdn, sdk, syb, sym, syn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # Y[b, m, n] = Σ_k X[b, m, k] (W[n, k] + Δ[index[b], n, k])
    pid = tl.program_id(0)
    b = tl.program_id(1)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    e = tl.load(IDX + b)
    X += b * sxb
    DELTA += e * sde
    Y += b * syb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_m[:, None] * sxm + kk[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_n[None, :] & mask_k[:, None]
        w = tl.load(W + offs_n[None, :] * swn + kk[:, None] * swk, mask=wmask, other=0.0).to(tl.float32)
        d = tl.load(DELTA + offs_n[None, :] * sdn + kk[:, None] * sdk, mask=wmask, other=0.0).to(tl.float32)
        acc = tl.dot(x, (w + d).to(X.dtype.element_ty), acc, input_precision=PRECISION)      # (BLOCK_K, BLOCK_N)
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def blocks(M: int, N: int) -> tuple[int, int, int, int, int]:
    if interpret():
        return 16, 32, 32, 4, 1
    return 64, 64 if N < 1024 else 128, 32, 4, 3


@triton_op("t2i_fast::kv_delta_gemm", mutates_args={})
def kv_delta_gemm(x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, M, K), w (N, K), delta (E, N, K), index (B,) int64, any strides -> (B, M, N)."""
    B, M, K = x.shape
    N = w.shape[0]
    y = torch.empty((B, M, N), device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = blocks(M, N)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), B)
    wrap_triton(_kv_delta_kernel)[grid](
        x, w, delta, index, y, M, N, K,
        *x.stride(), *w.stride(), *delta.stride(), *y.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision(x.dtype), num_warps=warps, num_stages=stages,
    )
    return y
