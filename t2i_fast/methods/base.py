"""What a personalization method is: which parameters train, how the models are patched, what is saved.

The trainer only talks to this interface, so adding a method means adding a file to methods/ and a line
to the registry in methods/__init__.py; the training loop does not change.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..models import Components


class Method:
    name = "base"
    #: True when the text encoder (or its input embeddings) train, so text features cannot be cached
    trains_text_encoder = False
    #: True when the method uses class images (prior preservation) if the config names some
    uses_prior = True
    #: True for Custom Diffusion's rescale augmentation (variants with masks and prompt prefixes)
    rescale_augment = False

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

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) encoder hidden states, with gradients where the method trains them."""
        te = self.comps.text_encoder
        return te(input_ids.to(te.device))[0]

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
