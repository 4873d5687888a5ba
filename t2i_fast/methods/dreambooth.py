"""DreamBooth (Ruiz et al. 2023): the whole UNet trains (optionally the whole text encoder), with prior
preservation from class images when the config names some (a folder, or generated from --class-prompt).

The identifier is written as the user gives it (a rare word such as "sks"); no token is added unless
--init-embeddings names a learned one (two_stage's full stage 2), which is added frozen. The low-memory
switches are the core's: --gradient-checkpointing, --optimizer adamw8bit, --cache-latents (the VAE leaves
the device before the first step) and, with a frozen text encoder, --cache-text.

Saved as a diffusers pipeline folder (safetensors) at the top of the output folder, so
`StableDiffusionPipeline.from_pretrained(OUT)` loads the personalized model. Components that did not
train are written in fp32 from the base model, not from their reduced-precision training copies.

On SDXL, --train-text-encoder trains both text encoders, and the folder is a StableDiffusionXLPipeline's
(`StableDiffusionXLPipeline.from_pretrained(OUT)`); --init-embeddings takes an SDXL embedding file there.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .. import formats, run_folder
from ..errors import UserError
from ..stopping import StopPreset
from .base import Method
from .lora import add_frozen_embeddings, expand_init_tokens


def inference_scheduler(model: str, fallback):
    """The base model's own sampling scheduler (the training copy is a DDPMScheduler)."""
    import diffusers

    from ..models import read_model_index

    entry = read_model_index(model).get("scheduler") if Path(model).is_dir() else None
    try:
        cls = getattr(diffusers, entry[1])
        return cls.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    except (TypeError, IndexError, AttributeError, OSError, ValueError):
        return fallback


class DreamBooth(Method):
    name = "dreambooth"
    uses_prior = True
    defaults = dict(lr=5e-6, max_steps=1000, weight_decay=1e-2)
    stop = StopPreset(440, 0.4, 1000, 200)  # LoRA's: the same objective on all UNet weights
    saves = "a whole diffusers pipeline folder; load it with StableDiffusionPipeline.from_pretrained(RUN)"
    saves_frozen_models = True
    families = ("sd1", "sd2", "sdxl")

    @classmethod
    def check(cls, cfg):
        if cfg.train_token:
            raise UserError("--train-token is for --method lora; DreamBooth binds the identifier as written "
                            "(a rare word such as 'sks'), or pass --init-embeddings with a learned token")

    @property
    def trains_text_encoder(self):
        return self.cfg.train_text_encoder

    @property
    def full_precision_modules(self):
        return ("unet", "text_encoder", "text_encoder_2") if self.cfg.train_text_encoder else ("unet",)

    def prompt(self, text):
        return expand_init_tokens(text, self.cfg.init_embeddings)

    def setup(self, comps):
        super().setup(comps)
        if self.cfg.init_embeddings:
            add_frozen_embeddings(comps, self.cfg.init_embeddings)
        self.modules = {"unet": comps.unet}
        if self.cfg.train_text_encoder:
            self.modules["text_encoder"] = comps.text_encoder
            if comps.text_encoder_2 is not None:  # SDXL: both encoders train
                self.modules["text_encoder_2"] = comps.text_encoder_2
        for module in self.modules.values():
            # fp32 master weights (the trainer left these modules uncast); autocast does the low-precision compute
            module.float().requires_grad_(True)

    def param_groups(self):
        return [{"params": [p for m in self.modules.values() for p in m.parameters()]}]

    def train(self):
        for module in self.modules.values():
            module.train()

    def trainable_state(self):
        return {f"{prefix}.{name}": p for prefix, m in self.modules.items() for name, p in m.named_parameters()}

    def _text_encoders_to_save(self) -> dict:
        """The text encoder(s) and tokenizer(s) to write, as pipeline keyword arguments: the trained (or fp32)
        ones, else the base model's in fp32 (the frozen copies were cast to the compute dtype), with the
        --init-embeddings tokens added again."""
        comps = self.comps
        if all(p.dtype == torch.float32 for te in comps.text_encoders for p in te.parameters()):
            fresh = comps
        else:
            from ..models import load_components

            fresh = load_components(self.cfg.model)
            if self.cfg.init_embeddings:
                add_frozen_embeddings(fresh, self.cfg.init_embeddings)
        parts = {"text_encoder": fresh.text_encoder, "tokenizer": fresh.tokenizer}
        if comps.text_encoder_2 is not None:
            parts.update(text_encoder_2=fresh.text_encoder_2, tokenizer_2=fresh.tokenizer_2)
        return parts

    def save(self, out: Path):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        out = Path(out)
        parts = dict(vae=self.comps.vae, unet=self.comps.unet, **self._text_encoders_to_save(),
                     scheduler=inference_scheduler(self.cfg.model, self.comps.scheduler))
        if self.comps.family == "sdxl":
            pipe = StableDiffusionXLPipeline(**parts)
        else:
            pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        tmp = out / ".pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        formats.shareable(tmp)
        return run_folder.replace_entries(tmp, out)
