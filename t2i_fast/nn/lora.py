"""LoRA linear layer: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, computed by the fused kernels.lora_linear."""
from __future__ import annotations

import math

import torch
from torch import nn


# How lora_A starts. kaiming: peft's default (init_lora_weights=True), as nn.Linear initialises a weight.
# gaussian: peft's init_lora_weights="gaussian", normal with std 1/rank, which diffusers'
# train_dreambooth_lora.py asks for; with it a user reproduces that script's runs.
INITS = {
    "kaiming": lambda a, rank: nn.init.kaiming_uniform_(a, a=math.sqrt(5)),
    "gaussian": lambda a, rank: nn.init.normal_(a, std=1 / rank),
}


class WrappedLinear(nn.Module):
    """A module in the place of a frozen nn.Linear `base`, which diffusers code still reads as a linear layer
    (in_features, out_features, weight, bias)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # diffusers code reads .weight of projections (e.g. dtype checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias


class LoRALinear(WrappedLinear):
    """Wraps a frozen nn.Linear `base` with a trainable low-rank update.

    lora_A: (rank, in_features), initialised by `init` (see INITS); lora_B: (out_features, rank), zeros, so
    the wrapped layer starts out exactly equal to `base`. scale = alpha / rank.
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None, init: str = "kaiming"):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
        super().__init__(base)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=torch.float32))
        INITS[init](self.lora_A, rank)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from t2i_fast.kernels import lora_linear

        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scale)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"
