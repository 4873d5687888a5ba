"""Triton flash attention behind kernels.attention (imported lazily: importing it imports Triton).

Forward (FlashAttention-2): one program per (BLOCK_M query rows, batch·head); K/V streamed in BLOCK_N
tiles with an online softmax in the log2 domain; writes O and the row log-sum-exp (base 2). Backward:
delta = rowsum(O ∘ dO), then one kernel per K/V tile for dK, dV (looping over query tiles) and one per
query tile for dQ (looping over K/V tiles): no atomics, deterministic, no Nq×Nk matrix in memory.

Head dims that are not powers of two are split into two power-of-two pieces D = D0 + D1 (both >= 16,
tl.dot's minimum; see _dispatch.head_split): every product over D is the sum of the two pieces' products,
and every output over D is written as two pieces. D=80 -> 64+16 and D=160 -> 128+32 waste nothing;
D=40 -> 32+16 computes 8 masked lanes (17%, against 37.5% when padding to 64). Loads of the padded
lanes are masked, so they cost no memory traffic.
Accumulation is fp32; P and dS are cast to the input dtype before their GEMMs (as FlashAttention does).
Registered as t2i_fast::flash_attn_fwd / t2i_fast::flash_attn_bwd with torch.library.triton_op.
Unverified on a GPU here (no GPU on the development machine): block sizes are educated guesses; every
configuration compiles ahead of time for sm_90 (fp32/fp16/bf16) without register spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._dispatch import head_split, interpret
from ._dispatch import dot_precision as _precision

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale, Nq, Nk, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # O = softmax(Q Kᵀ · scale) V;  LSE = log2 Σ_n exp2(Q Kᵀ · scale · log2 e)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    mask_m = offs_m < Nq
    mask_d0 = d0 < D
    q0 = tl.load(Q + offs_m[:, None] * sqn + d0[None, :] * sqd, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        mask_d1 = d1 < D
        q1 = tl.load(Q + offs_m[:, None] * sqn + d1[None, :] * sqd, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nk
        k0t = tl.load(K + cols[None, :] * skn + d0[:, None] * skd, mask=mask_n[None, :] & mask_d0[:, None], other=0.0)
        s = tl.dot(q0, k0t, input_precision=PRECISION)                                   # (BLOCK_M, BLOCK_N)
        if D1 > 0:
            k1t = tl.load(K + cols[None, :] * skn + d1[:, None] * skd, mask=mask_n[None, :] & mask_d1[:, None], other=0.0)
            s = tl.dot(q1, k1t, s, input_precision=PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        pv = p.to(V.dtype.element_ty)
        v0 = tl.load(V + cols[:, None] * svn + d0[None, :] * svd, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
        acc0 = tl.dot(pv, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(V + cols[:, None] * svn + d1[None, :] * svd, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    inv_l = 1.0 / l_i
    tl.store(O + offs_m[:, None] * son + d0[None, :] * sod, (acc0 * inv_l[:, None]).to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d0[None, :])
    if D1 > 0:
        tl.store(O + offs_m[:, None] * son + d1[None, :] * sod, (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d1[None, :])
    tl.store(LSE + pid_bh * Nq + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, qk_scale, Nq, Nk, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # Pᵀ = exp2(K Qᵀ · scale·log2e − LSE);  dV = Σ_m Pᵀ dO;  dPᵀ = V dOᵀ;  dSᵀ = Pᵀ ∘ (dPᵀ − delta)
    # dK = scale · Σ_m dSᵀ Q   (delta = rowsum(O ∘ dO))
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DK += b * sdkb + h * sdkh
    DV += b * sdvb + h * sdvh
    LSE += pid_bh * Nq
    DELTA += pid_bh * Nq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    mask_n = offs_n < Nk
    mask_d0 = d0 < D
    k0 = tl.load(K + offs_n[:, None] * skn + d0[None, :] * skd, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
    v0 = tl.load(V + offs_n[:, None] * svn + d0[None, :] * svd, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        mask_d1 = d1 < D
        k1 = tl.load(K + offs_n[:, None] * skn + d1[None, :] * skd, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
        v1 = tl.load(V + offs_n[:, None] * svn + d1[None, :] * svd, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Nq
        q0 = tl.load(Q + rows[:, None] * sqn + d0[None, :] * sqd, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
        do0 = tl.load(DO + rows[:, None] * sdon + d0[None, :] * sdod, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
        st = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)                        # (BLOCK_N, BLOCK_M)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
        if D1 > 0:
            q1 = tl.load(Q + rows[:, None] * sqn + d1[None, :] * sqd, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
            do1 = tl.load(DO + rows[:, None] * sdon + d1[None, :] * sdod, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
            st = tl.dot(k1, tl.trans(q1), st, input_precision=PRECISION)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PRECISION)
        lse = tl.load(LSE + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
        pt = tl.where(mask_m[None, :], tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
        ptc = pt.to(DO.dtype.element_ty)
        dv0 = tl.dot(ptc, do0, dv0, input_precision=PRECISION)
        dk0 = tl.dot(dst, q0, dk0, input_precision=PRECISION)
        if D1 > 0:
            dv1 = tl.dot(ptc, do1, dv1, input_precision=PRECISION)
            dk1 = tl.dot(dst, q1, dk1, input_precision=PRECISION)
    tl.store(DK + offs_n[:, None] * sdkn + d0[None, :] * sdkd, (dk0 * sm_scale).to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d0[None, :])
    tl.store(DV + offs_n[:, None] * sdvn + d0[None, :] * sdvd, dv0.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & mask_d0[None, :])
    if D1 > 0:
        tl.store(DK + offs_n[:, None] * sdkn + d1[None, :] * sdkd, (dk1 * sm_scale).to(DK.dtype.element_ty),
                 mask=mask_n[:, None] & mask_d1[None, :])
        tl.store(DV + offs_n[:, None] * sdvn + d1[None, :] * sdvd, dv1.to(DV.dtype.element_ty),
                 mask=mask_n[:, None] & mask_d1[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, sm_scale, qk_scale, Nq, Nk, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # P = exp2(Q Kᵀ · scale·log2e − LSE);  dP = dO Vᵀ;  dS = P ∘ (dP − delta);  dQ = scale · Σ_n dS K
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    mask_m = offs_m < Nq
    mask_d0 = d0 < D
    q0 = tl.load(Q + offs_m[:, None] * sqn + d0[None, :] * sqd, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
    do0 = tl.load(DO + offs_m[:, None] * sdon + d0[None, :] * sdod, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        mask_d1 = d1 < D
        q1 = tl.load(Q + offs_m[:, None] * sqn + d1[None, :] * sqd, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        do1 = tl.load(DO + offs_m[:, None] * sdon + d1[None, :] * sdod, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Nk
        k0 = tl.load(K + cols[:, None] * skn + d0[None, :] * skd, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
        v0 = tl.load(V + cols[:, None] * svn + d0[None, :] * svd, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)                           # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if D1 > 0:
            k1 = tl.load(K + cols[:, None] * skn + d1[None, :] * skd, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            v1 = tl.load(V + cols[:, None] * svn + d1[None, :] * svd, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        p = tl.where(mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
    tl.store(DQ + offs_m[:, None] * sdqn + d0[None, :] * sdqd, (dq0 * sm_scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d0[None, :])
    if D1 > 0:
        tl.store(DQ + offs_m[:, None] * sdqn + d1[None, :] * sdqd, (dq1 * sm_scale).to(DQ.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d1[None, :])


def fwd_config(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward."""
    if interpret():
        return 16, 32, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def bwd_config(d: int) -> tuple[int, int, int, int, int, int]:
    """(dkdv BLOCK_M, BLOCK_N, dq BLOCK_M, BLOCK_N, num_warps, num_stages) for the backward."""
    if interpret():
        return 16, 32, 16, 32, 4, 1
    if d <= 64:
        return 32, 128, 128, 32, 8, 3
    if d <= 128:
        return 32, 64, 64, 32, 8, 2
    return 16, 64, 64, 16, 8, 1


def _empty_like_bnhd(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n, D) view of a (B, n, H, D) buffer: the caller's transpose(1, 2).reshape is then free."""
    B, H, _, D = t.shape
    return torch.empty((B, n, H, D), device=t.device, dtype=t.dtype).transpose(1, 2)


@triton_op("t2i_fast::flash_attn_fwd", mutates_args={})
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k, v (B, H, Nk, D), any strides -> (o (B, H, Nq, D), lse2 (B, H, Nq) fp32, base 2)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = _empty_like_bnhd(q, Nq)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    d0, d1 = head_split(D)
    bm, bn, warps, stages = fwd_config(D)
    grid = (triton.cdiv(Nq, bm), B * H)
    wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v, o, lse, scale * LOG2E, Nq, Nk, H,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        D=D, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return o, lse


@triton_op("t2i_fast::flash_attn_bwd", mutates_args={})
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_attn_fwd, each shaped (and strided) like its input."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = (o.float() * do.float()).sum(-1).contiguous()                                   # (B, H, Nq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d0, d1 = head_split(D)
    bm1, bn1, bm2, bn2, warps, stages = bwd_config(D)
    prec = _precision(q.dtype)
    wrap_triton(_attn_bwd_dkdv_kernel)[(triton.cdiv(Nk, bn1), B * H)](
        q, k, v, do, dk, dv, lse, delta, scale, scale * LOG2E, Nq, Nk, H,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        D=D, D0=d0, D1=d1, BLOCK_M=bm1, BLOCK_N=bn1, PRECISION=prec, num_warps=warps, num_stages=stages,
    )
    wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(Nq, bm2), B * H)](
        q, k, v, do, dq, lse, delta, scale, scale * LOG2E, Nq, Nk, H,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        D=D, D0=d0, D1=d1, BLOCK_M=bm2, BLOCK_N=bn2, PRECISION=prec, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
