"""DreamBooth-LoRA: low-rank updates on the UNet attention projections (to_q, to_k, to_v, to_out.0),
optionally on the text encoder's attention (q/k/v/out_proj), optionally with a new token trained
alongside (pivotal tuning)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import formats
from ..nn.lora import LoRALinear
from .base import Method
from .tokens import add_tokens

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def inject_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float | None) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose dotted path ends with one of `targets`; return {path: LoRALinear}."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    layers = {}
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(linear, rank, alpha)
        setattr(parent, child, layer) if not child.isdigit() else parent.__setitem__(int(child), layer)
        layers[name] = layer
    if not layers:
        raise ValueError(f"no linear layers named {targets} found in {type(model).__name__}")
    return layers


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Put the base nn.Linear layers back (merging the update into them if `merge`)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            if merge:
                m.base.weight.data.copy_(m.merged_weight())
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.base) if not child.isdigit() else parent.__setitem__(int(child), m.base)


class LoRA(Method):
    name = "lora"

    @property
    def trains_text_encoder(self):
        return self.cfg.train_text_encoder or self.cfg.train_token

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        self.unet_layers = inject_lora(comps.unet, UNET_TARGETS, cfg.lora_rank, cfg.lora_alpha)
        self.text_layers = (inject_lora(comps.text_encoder, TEXT_TARGETS, cfg.lora_rank, cfg.lora_alpha)
                            if cfg.train_text_encoder else {})
        self.embedding = (add_tokens(comps.tokenizer, comps.text_encoder, cfg.token, 1,
                                     cfg.initializer or cfg.class_word or None) if cfg.train_token else None)

    def _lora_params(self):
        return [p for layer in (*self.unet_layers.values(), *self.text_layers.values())
                for p in (layer.lora_A, layer.lora_B)]

    def param_groups(self):
        groups = [{"params": self._lora_params()}]
        if self.embedding is not None:
            groups.append({"params": [self.embedding.new], "lr": self.cfg.token_lr or 5e-3, "weight_decay": 0.0})
        return groups

    def trainable_state(self):
        state = {}
        for prefix, layers in (("unet", self.unet_layers), ("text_encoder", self.text_layers)):
            for path, layer in layers.items():
                state[f"{prefix}.{path}.lora_A"] = layer.lora_A
                state[f"{prefix}.{path}.lora_B"] = layer.lora_B
        if self.embedding is not None:
            state["token_embedding"] = self.embedding.new
        return state

    def save(self, out: Path):
        formats.save_lora(out / formats.LORA_FILE, {"unet": self.unet_layers, "text_encoder": self.text_layers},
                          self.cfg)
        files = [formats.LORA_FILE]
        if self.embedding is not None:
            formats.save_textual_inversion(out / formats.TI_FILE, self.cfg.token, self.embedding.new, self.cfg)
            files.append(formats.TI_FILE)
        return files
