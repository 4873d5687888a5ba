"""Kernels (installed as t2i_fast.kernels). Placeholder until the fused kernels land: the plain twins."""
from .lora_linear import lora_linear, lora_linear_ref  # noqa: F401
