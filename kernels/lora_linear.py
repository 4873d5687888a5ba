"""LoRA linear. Placeholder: the plain PyTorch twin only."""
import torch
import torch.nn.functional as F


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale):
    """x (..., in), weight (out, in), bias (out) or None, lora_a (r, in), lora_b (out, r) -> (..., out)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


lora_linear = lora_linear_ref
