"""The personalization methods, one file each, looked up by name.

A method is one class (methods/base.py): a new one is its file plus its line below. A method trained in
one run of the trainer subclasses Method; one made of several runs in a row (two_stage) subclasses
StagedMethod, and t2i_fast.train runs its stages (recipe.py).
"""
from __future__ import annotations

import dataclasses
import importlib

from ..config import TrainConfig
from ..errors import UserError

REGISTRY = {
    "lora": "t2i_fast.methods.lora:LoRA",
    "textual_inversion": "t2i_fast.methods.textual_inversion:TextualInversion",
    "custom_diffusion": "t2i_fast.methods.custom_diffusion:CustomDiffusion",
    "dreambooth": "t2i_fast.methods.dreambooth:DreamBooth",
    "two_stage": "t2i_fast.methods.two_stage:TwoStage",
    "selfattn_copy": "t2i_fast.methods.selfattn_copy:SelfAttnCopy",
    "e4t": "t2i_fast.methods.e4t:E4T",
}

# Defaults of fields left None for every method, after the bundled example concept filled its own (app.py)
GENERAL_DEFAULTS = {"token": "<sks>", "early_stop": "dvar", "batch_size": 1}


def get_method(name: str):
    """The method class registered as `name`."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """cfg with every field left None that its method's defaults (or GENERAL_DEFAULTS) cover filled in."""
    defaults = {**GENERAL_DEFAULTS, **get_method(cfg.method).defaults}
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def check_family(method, cfg: TrainConfig, family: str | None) -> None:
    """method.check_family(cfg, family), whose refusal of a model family names the methods that train it."""
    others = ()
    if family is not None and family not in method.families:
        others = tuple(n for n in REGISTRY if family in get_method(n).families)
    method.check_family(cfg, family, others)
