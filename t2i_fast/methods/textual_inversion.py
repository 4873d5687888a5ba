"""Textual Inversion (Gal et al. 2022): learn embedding vector(s) for a new token; nothing else trains."""
from __future__ import annotations

from pathlib import Path

from .. import formats
from ..data import OBJECT_TEMPLATES
from ..stopping import StopPreset
from .base import Method, refuse_one_token_for_concepts, refuse_template_without_token
from .tokens import add_tokens, expand_token


class TextualInversion(Method):
    name = "textual_inversion"
    trains_text_encoder = True  # its input embeddings train, so prompts are encoded every step
    uses_prior = False
    defaults = dict(lr=5e-3, max_steps=6100, weight_decay=0.0)
    stop = StopPreset(310, 0.15, 6100, 1000)  # the DVAR paper's
    templates = tuple(OBJECT_TEMPLATES)  # the paper's and diffusers' object templates
    export_formats = ("a1111",)
    saves = "a token embedding, not a LoRA"

    @classmethod
    def check(cls, cfg):
        refuse_one_token_for_concepts(cfg, "textual_inversion")
        refuse_template_without_token(cfg, "the token, all that trains, would never be seen")

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        self.embedding = add_tokens(comps.tokenizer, comps.text_encoder, cfg.token, cfg.num_vectors,
                                    cfg.initializer or cfg.class_word or None)

    def prompt(self, text):
        return expand_token(text, self.cfg.token, self.cfg.num_vectors)

    def param_groups(self):
        group = {"params": [self.embedding.new]}
        if self.cfg.token_lr is not None:  # the token is all that trains: --token-lr, where given, is its rate
            group["lr"] = self.cfg.token_lr
        return [group]

    def trainable_state(self):
        return {"token_embedding": self.embedding.new}

    def save(self, out: Path):
        formats.save_textual_inversion(out / formats.TI_FILE, self.cfg.token, self.embedding.new, self.cfg)
        return [formats.TI_FILE]
