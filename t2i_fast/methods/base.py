"""What a personalization method is, all in one class: its defaults, stop preset, prompt templates and
export formats (read without building it), which parameters train, how the models are patched, what is
saved and how it loads back.

The trainer, the sampler and the exporter only talk to this interface, so adding a method means adding a
file to methods/ and a line to the registry in methods/__init__.py; nothing else changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import adapter_files
from ..config import TrainConfig
from ..data import INSTANCE_TEMPLATE
from ..errors import UserError
from ..formats import read_init_embeddings
from ..models import Components, refuse_family
from ..stopping import StopPreset


def refuse_one_token_for_concepts(cfg: TrainConfig, what: str) -> None:
    """--concepts with a method (`what`) that learns a single token, which the concepts' prompts never use."""
    if cfg.concepts:
        raise UserError(f"--concepts with {what} would learn one token ({cfg.token}) that the concepts' prompts "
                        f"never use; train one concept per run, or use --method custom_diffusion, which learns a "
                        f"token per concept")


def refuse_template_without_token(cfg: TrainConfig, why: str) -> None:
    """--template without {token}, for a method whose training needs the token in every prompt (`why` says so)."""
    if cfg.template and "{token}" not in cfg.template:
        raise UserError(f"--template {cfg.template!r} has no {{token}}: {why}; add {{token}} to the template")


class MethodSpec:
    """What a method declares, read from the class (no models are built)."""

    name = "base"
    #: values for the TrainConfig fields a user left None (user values override them)
    defaults: dict[str, Any] = {}
    #: DVAR window, threshold, step cap and few-steps budget (stopping.py); used for fields left None
    stop = StopPreset(440, 0.4, 1000, 200)
    #: prompt templates of the concept images ({token}, {cls}); --template replaces them
    templates: tuple[str, ...] = (INSTANCE_TEMPLATE,)
    #: `t2i-fast export` formats a run of this method can have, and what it saves where it has none
    export_formats: tuple[str, ...] = ()
    saves = "no file in the kohya or a1111 layout"
    #: hints for a run without the file a format needs: {format: text appended to the error}
    export_hints: dict[str, str] = {}
    #: the model families (models.detect_family) this method trains; a model of another is refused up front
    families: tuple[str, ...] = ("sd1", "sd2")

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """A UserError for options this method cannot honour (called before anything is loaded or written)."""

    @classmethod
    def check_family(cls, cfg: TrainConfig, family: str | None, others: tuple[str, ...] = ()) -> None:
        """A UserError where the model's family (None: not known yet) is not one this method trains, or where an
        option cannot be honoured on it; called with the family read from the model's config before anything is
        loaded or written, and again once the model is loaded. others: the methods that do train that family,
        named in the refusal (methods.check_family finds them)."""
        hint = f", or train this model with --method {' or '.join(others)}" if others else ""
        refuse_family(family, cls.families, f"--method {cls.name}", cfg.model, hint)
        init = getattr(cfg, "init_embeddings", None)
        if family is not None and init and Path(init).expanduser().is_file():  # (a later stage's is not written yet)
            read_init_embeddings(init, 2 if family == "sdxl" else 1)  # refuses the other family's layout

    @classmethod
    def prompt_templates(cls, cfg: TrainConfig) -> list[str]:
        return [cfg.template] if cfg.template else list(cls.templates)

    @classmethod
    def load(cls, pipe, folder: Path, names: list[str]) -> list[str]:
        """Load this method's files among `names` (in `folder`) into a diffusers pipeline, through diffusers'
        own loaders; return the names loaded. Every layout written so far is read by adapter_files."""
        return adapter_files.load_layouts(pipe, folder, names)


class Method(MethodSpec):
    """A method trained in one run of the trainer."""
    #: True when the text encoder (or its input embeddings) train, so text features cannot be cached
    trains_text_encoder = False
    #: True when the method uses class images (prior preservation) if the config names some
    uses_prior = True
    #: True for Custom Diffusion's rescale augmentation (variants with masks and prompt prefixes)
    rescale_augment = False
    #: how many of the concept's images train (the first ones, in file-name order); None: all of them
    images_used: int | None = None
    #: True when save() writes the frozen VAE and text encoders too (a whole pipeline): the trainer then keeps
    #: them after caching instead of releasing them
    saves_frozen_models = False

    @property
    def full_precision_modules(self) -> tuple[str, ...]:
        """Components ("unet", "text_encoder") this method trains whole: they stay fp32 (the optimizer's
        master weights) instead of being cast to the compute dtype, which would round them first."""
        return ()

    def __init__(self, cfg: TrainConfig, concepts: list = ()):
        """concepts: the concepts.Concept list the trainer read from cfg (--images or --concepts); a method
        reads them from here, never from the files again."""
        self.cfg = cfg
        self.training_concepts = list(concepts)
        self.comps: Components | None = None

    # --- set-up
    def setup(self, comps: Components) -> None:
        """Patch the models in place (add tokens, wrap layers). Called once, before any caching."""
        self.comps = comps

    def prompt(self, text: str) -> str:
        """The prompt as the tokenizer must see it (e.g. multi-vector tokens expanded)."""
        return text

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; each has "params" and may override "lr"."""
        raise NotImplementedError

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def train(self) -> None:
        """Put the trained modules in training mode (dropout etc.); the frozen ones stay in eval."""

    def regularizer(self) -> torch.Tensor | None:
        """A term added to every training loss (and the probe's), e.g. an L2 penalty; None: nothing."""
        return None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) encoder hidden states, with gradients where the method trains them."""
        te = self.comps.text_encoder
        return te(input_ids.to(te.device))[0]

    def encode_text_sdxl(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: (B, L) ids of each tokenizer -> (B, L, D1 + D2) hidden states and (B, P) pooled embeddings
        (sdxl.encode_prompt), with gradients where the method trains the encoders."""
        from ..sdxl import encode_prompt

        return encode_prompt(self.comps.text_encoders, (input_ids, input_ids_2))

    # --- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by a stable name (for checkpoints and resume)."""
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.trainable_state()
        missing = sorted(set(current) - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, tensor in current.items():
                tensor.copy_(state[name])

    def save(self, out: Path) -> list[str]:
        """Write the method's files into `out`; return their names."""
        raise NotImplementedError


class StagedMethod(MethodSpec):
    """A method made of several trainings in a row, each an ordinary Method run in a subfolder of the output
    folder with its own checkpoint, log and report; t2i_fast.train runs them (recipe.py)."""

    @classmethod
    def stages(cls, cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
        """(name, config) of each stage, in order; each trains into its own config's `out`."""
        raise NotImplementedError

    @classmethod
    def combine(cls, cfg: TrainConfig, out: Path, stage_folders: list[Path]) -> list[str]:
        """Place the stages' files at the top of `out` as this method's result; return their names."""
        raise NotImplementedError
