"""Drop-in speed-up for people who keep their own diffusers scripts.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    t2i_fast.patch(pipe)      # fused attention everywhere, peft LoRA layers run the fused LoRA kernel
    ...                       # train or sample as before
    t2i_fast.unpatch(pipe)    # back to exactly what it was

patch():
  - every diffusers Attention whose processor is AttnProcessor / AttnProcessor2_0 gets FastAttnProcessor;
    one with diffusers' Custom Diffusion processor gets FastCustomDiffusionAttnProcessor sharing the same
    Parameter objects (optimizer state and saved files are unaffected); other processors are left alone.
  - every peft LoRA `Linear` is converted in place: its `forward` is overridden on the instance to call
    kernels.lora_linear with the same weights, so module names, state_dict keys and parameter identity are
    unchanged. At call time it falls back to peft's own forward whenever the fused form would not be exact:
    adapters disabled or merged, several active adapters, DoRA, a LoRA bias, an active dropout (training
    with lora_dropout > 0), per-call adapter_names.
unpatch() restores the original processors and removes the overrides. Both return the number of modules
changed and are idempotent.
"""
from __future__ import annotations

import types

import torch
from torch import nn

_SAVED = "_t2i_fast_saved_processor"
_PATCHED = "_t2i_fast_patched_forward"


def _roots(obj) -> list[nn.Module]:
    """The modules to patch: a pipeline's unet/transformer and text encoders, or the module itself."""
    if isinstance(obj, nn.Module):
        return [obj]
    names = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")
    roots = [getattr(obj, n) for n in names if isinstance(getattr(obj, n, None), nn.Module)]
    if not roots:
        raise TypeError(f"t2i_fast.patch expects a diffusers pipeline or an nn.Module, got {type(obj).__name__}")
    return roots


def _fused_peft_forward(self, x: torch.Tensor, *args, **kwargs):
    """peft lora.Linear.forward, computed by kernels.lora_linear where that is exact."""
    from t2i_fast.kernels import lora_linear

    fallback = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return fallback(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.get_base_layer()
    if (name not in self.lora_A or not isinstance(base, nn.Linear) or getattr(self, "fan_in_fan_out", False)
            or self.use_dora.get(name, False) or name in getattr(self, "lora_variant", {})  # DoRA, aLoRA, ...
            or getattr(self.lora_B[name], "bias", None) is not None
            or (self.training and not isinstance(self.lora_dropout[name], nn.Identity)
                and getattr(self.lora_dropout[name], "p", 1.0) > 0)):
        return fallback(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_linear(x, base.weight, base.bias, a, b, self.scaling[name])  # it casts to one compute dtype


def _peft_linear_cls():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft not installed: nothing to convert
        return None
    return Linear


def patch(unet_or_pipeline) -> int:
    """Swap in t2i_fast's attention processors and fused peft LoRA layers. Returns modules changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from t2i_fast.nn.attention import (CUSTOM_DIFFUSION_PROCESSORS, FastAttnProcessor,
                                       FastCustomDiffusionAttnProcessor)

    peft_linear = _peft_linear_cls()
    changed = 0
    for root in _roots(unet_or_pipeline):
        for module in root.modules():
            if isinstance(module, Attention) and not hasattr(module, _SAVED):
                proc = module.processor
                if type(proc) in (AttnProcessor, AttnProcessor2_0):
                    new = FastAttnProcessor()
                elif type(proc) in CUSTOM_DIFFUSION_PROCESSORS:
                    new = FastCustomDiffusionAttnProcessor.from_diffusers(proc)
                else:
                    continue
                object.__setattr__(module, _SAVED, proc)      # not registered: no state_dict entry
                module.set_processor(new)
                changed += 1
            elif peft_linear is not None and isinstance(module, peft_linear) and not hasattr(module, _PATCHED):
                module.forward = types.MethodType(_fused_peft_forward, module)
                object.__setattr__(module, _PATCHED, True)
                changed += 1
    return changed


def unpatch(unet_or_pipeline) -> int:
    """Undo patch(): the original processor objects come back, the forward overrides go. Returns modules changed."""
    changed = 0
    for root in _roots(unet_or_pipeline):
        for module in root.modules():
            if hasattr(module, _SAVED):
                proc = module.__dict__.pop(_SAVED)
                module.set_processor(proc)
                changed += 1
            if module.__dict__.pop(_PATCHED, False):
                module.__dict__.pop("forward", None)
                changed += 1
    return changed
