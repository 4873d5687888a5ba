"""Optimizer factory. (8-bit optimizers land with the native extension.)"""
from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(name: str, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """Build the optimizer called `name` over `params` (an iterable of tensors or param groups)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=_fused_ok(params))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _fused_ok(params) -> bool:
    """torch's fused AdamW handles float tensors on CPU and CUDA alike."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
