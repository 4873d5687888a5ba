"""t2i_fast: fast, low-memory personalization of Stable Diffusion models.

The public API is small and loaded lazily, so `import t2i_fast` imports neither diffusers nor Triton and
never initialises CUDA.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "t2i_fast.config",
    "PRESETS": "t2i_fast.config",
    "train": "t2i_fast.recipe",
    "train_many": "t2i_fast.train_many",
    "TrainResult": "t2i_fast.trainer",
    "sample": "t2i_fast.sampling",
    "load_adapter": "t2i_fast.sampling",
    "MultiAdapterPipeline": "t2i_fast.sampling",
    "patch": "t2i_fast.patching",
    "unpatch": "t2i_fast.patching",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't2i_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
