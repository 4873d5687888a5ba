"""Fused kernels with plain PyTorch twins: the package t2i_fast.kernels.

    attention(q, k, v, scale=None)                       flash attention, fused forward and backward
    lora_linear(x, weight, bias, lora_a, lora_b, scale)  y = x Wᵀ + b + s (x Aᵀ) Bᵀ
    kv_delta(context, weight, delta, index=None)         context (W + Δ[index])ᵀ, per-sample deltas

Each op runs Triton on CUDA (or on CPU under TRITON_INTERPRET=1), a fused PyTorch autograd.Function
elsewhere, and its `<op>_ref` twin inside `with use_kernels(False):` or, as the default outside such a
block, when T2I_FAST_KERNELS=0 (see _dispatch.py). Importing this package
imports neither Triton nor initialises CUDA.

Where the ops live. Their modules sit in the top-level `kernels/` folder, which has no `__init__.py` on
purpose: the PyPI package `kernels` (pulled in by recent transformers) owns the import name "kernels", and
a regular package of that name at the repository root would shadow it for `python -c`, pytest and
`python bench/...` run from there (diffusers then fails to import). A folder without `__init__.py` is
only a namespace candidate, which an installed package of the same name always beats. This module is
the package: its `__path__` points at that folder in a source checkout (the editable install), and at
`t2i_fast/kernels/`, where setup.py copies the folder, in a built wheel.
"""
from pathlib import Path as _Path

_wheel_dir = _Path(__file__).with_suffix("")  # t2i_fast/kernels/ in a built wheel
__path__ = [str(_wheel_dir if _wheel_dir.is_dir() else _Path(__file__).resolve().parent.parent / "kernels")]
# a module with a __path__ is a package; these two make relative imports below resolve inside it
__spec__.submodule_search_locations = __path__
__package__ = __name__

from .attention import attention, attention_ref  # noqa: E402 - needs __path__ above
from .kv_delta import kv_delta, kv_delta_ref  # noqa: E402
from .lora_linear import lora_linear, lora_linear_ref  # noqa: E402
from ._dispatch import backend, use_kernels  # noqa: E402

__all__ = ["attention", "attention_ref", "lora_linear", "lora_linear_ref", "kv_delta", "kv_delta_ref", "backend", "use_kernels"]
