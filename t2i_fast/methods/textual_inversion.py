"""Textual Inversion (Gal et al. 2022): learn embedding vector(s) for a new token; nothing else trains.

On SDXL the token is added to both tokenizers and learns one embedding per text encoder (as diffusers'
SDXL examples and A1111/ComfyUI's SDXL embeddings do), saved as {"clip_l", "clip_g"}."""
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
    families = ("sd1", "sd2", "sdxl")

    @classmethod
    def check(cls, cfg):
        refuse_one_token_for_concepts(cfg, "textual_inversion")
        refuse_template_without_token(cfg, "the token, all that trains, would never be seen")

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        self.embedding = add_tokens(comps.tokenizer, comps.text_encoder, cfg.token, cfg.num_vectors,
                                    cfg.initializer or cfg.class_word or None)
        self.embedding_2 = (add_tokens(comps.tokenizer_2, comps.text_encoder_2, cfg.token, cfg.num_vectors,
                                       cfg.initializer or cfg.class_word or None)
                            if comps.text_encoder_2 is not None else None)

    @property
    def embeddings(self) -> list:
        return [e for e in (self.embedding, self.embedding_2) if e is not None]

    def prompt(self, text):
        return expand_token(text, self.cfg.token, self.cfg.num_vectors)

    def param_groups(self):
        group = {"params": [e.new for e in self.embeddings]}
        if self.cfg.token_lr is not None:  # the token is all that trains: --token-lr, where given, is its rate
            group["lr"] = self.cfg.token_lr
        return [group]

    def trainable_state(self):
        state = {"token_embedding": self.embedding.new}
        if self.embedding_2 is not None:
            state["token_embedding_2"] = self.embedding_2.new
        return state

    def save(self, out: Path):
        formats.save_token_embedding(out / formats.TI_FILE, self.cfg.token, [e.new for e in self.embeddings],
                                     self.cfg)
        return [formats.TI_FILE]
