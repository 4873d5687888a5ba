"""Fused kernels with plain PyTorch twins (installed as t2i_fast.kernels).

    attention(q, k, v, scale=None)                       flash attention, fused forward and backward
    lora_linear(x, weight, bias, lora_a, lora_b, scale)  y = x Wᵀ + b + s (x Aᵀ) Bᵀ
    kv_delta(context, weight, delta, index=None)         context (W + Δ[index])ᵀ, per-sample deltas

Each op runs Triton on CUDA (or on CPU under TRITON_INTERPRET=1), a fused PyTorch autograd.Function
elsewhere, and its `<op>_ref` twin when T2I_FAST_KERNELS=0 (see _dispatch.py). Importing this package
imports neither Triton nor initialises CUDA.
"""
from .attention import attention, attention_ref
from .kv_delta import kv_delta, kv_delta_ref
from .lora_linear import lora_linear, lora_linear_ref
from ._dispatch import backend

__all__ = ["attention", "attention_ref", "lora_linear", "lora_linear_ref", "kv_delta", "kv_delta_ref", "backend"]
