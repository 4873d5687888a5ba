"""Triton kernel behind kernels.lora_linear (imported lazily: importing it imports Triton).

One GEMM with a low-rank side output: Y = X Wᵀ (+ bias) and, in the programs of the first column of
output tiles only, XU = X Uᵀ from the X tiles already loaded (U has r <= 64 rows). The forward uses it
with W = W + s·B·A (merged, out×in) and U = A, giving y and x·Aᵀ; the backward with W = (W + s·B·A)ᵀ and
U = Bᵀ, giving dx and dy·B. dA and dB are then one skinny GEMM each (done by torch: cuBLAS).
Registered with torch.library.triton_op as t2i_fast::lora_gemm so torch.compile can trace it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._dispatch import dot_precision as precision
from ._dispatch import interpret, next_pow2


@triton.jit
def _gemm_lowrank_kernel(
    X, W, BIAS, U, Y, XU,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ur, stride_uk,
    stride_ym, stride_yn, stride_xum, stride_xur,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    # Y[m, n] = sum_k X[m, k] W[n, k] + bias[n];  XU[m, j] = sum_k X[m, k] U[j, k]  (pid_n == 0 only)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share W tiles in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    do_u = pid_n == 0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)            # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if do_u:
            u = tl.load(U + offs_r[None, :] * stride_ur + kk[:, None] * stride_uk,
                        mask=mask_r[None, :] & mask_k[:, None], other=0.0)        # (BLOCK_K, BLOCK_R)
            acc_u = tl.dot(x, u, acc_u, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
    if do_u:
        tl.store(XU + offs_m[:, None] * stride_xum + offs_r[None, :] * stride_xur, acc_u.to(XU.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])


def blocks(M: int, N: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); small under the interpreter so tests span tiles."""
    if interpret():
        return 32, 32, 32, 4, 1
    if N >= 128 and M >= 128:
        return 128, 128, 32, 8, 3
    return 64, 64, 32, 4, 3


@triton_op("t2i_fast::lora_gemm", mutates_args={})
def lora_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), w (N, K), bias (N) or None, u (R, K), any strides -> (x wᵀ + bias (M, N), x uᵀ (M, R))."""
    M, K = x.shape
    N, R = w.shape[0], u.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xu = torch.empty((M, R), device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = blocks(M, N)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    wrap_triton(_gemm_lowrank_kernel)[grid](
        x, w, bias if bias is not None else y, u, y, xu,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        y.stride(0), y.stride(1), xu.stride(0), xu.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=max(16, next_pow2(R)), GROUP_M=8,
        PRECISION=precision(x.dtype), num_warps=warps, num_stages=stages,
    )
    return y, xu
