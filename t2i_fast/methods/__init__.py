"""The personalization methods, one file each, looked up by name."""
from __future__ import annotations

import importlib

from ..errors import UserError

REGISTRY = {
    "lora": "t2i_fast.methods.lora:LoRA",
    "textual_inversion": "t2i_fast.methods.textual_inversion:TextualInversion",
    "custom_diffusion": "t2i_fast.methods.custom_diffusion:CustomDiffusion",
    "dreambooth": "t2i_fast.methods.dreambooth:DreamBooth",
    "two_stage": "t2i_fast.methods.two_stage:TwoStage",
}


def get_method(name: str):
    """The Method class registered as `name`."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
