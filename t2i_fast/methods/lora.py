"""DreamBooth-LoRA: low-rank updates on the UNet attention projections (to_q, to_k, to_v, to_out.0),
optionally on the text encoder's attention (q/k/v/out_proj), optionally with a new token trained
alongside (pivotal tuning).

On SDXL the same layers of its UNet train, and --train-text-encoder puts LoRA on both text encoders (saved
under text_encoder. and text_encoder_2., as StableDiffusionXLPipeline.load_lora_weights reads them), as
diffusers' train_dreambooth_lora_sdxl.py does, and --train-token learns the token in both encoders (saved as the
SDXL embedding file, formats.py); --init-embeddings takes that SDXL file and adds its token to both."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from .. import formats
from ..errors import UserError
from ..nn.lora import INITS, LoRALinear
from ..stopping import StopPreset
from .base import Method, refuse_one_token_for_concepts
from .tokens import add_tokens, expand_token, token_names

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def inject_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float | None,
                init: str = "kaiming") -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose dotted path ends with one of `targets`; return {path: LoRALinear}."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    layers = {}
    for name, linear in found:
        layers[name] = layer = LoRALinear(linear, rank, alpha, init)
        model.set_submodule(name, layer)
    if not layers:
        raise ValueError(f"no linear layers named {targets} found in {type(model).__name__}")
    return layers


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Put the base nn.Linear layers back (merging the update into them if `merge`)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            if merge:
                m.base.weight.data.copy_(m.merged_weight())
            model.set_submodule(name, m.base)


def add_frozen_embeddings(comps, path: str | Path) -> list[str]:
    """Add the tokens of a learned_embeds file to the tokenizer(s) and write their vectors into the text
    encoders' embedding matrices, frozen (each encoder stays a plain CLIP model, so it saves as one); on SDXL
    clip_l goes to the first encoder and clip_g to the second. Returns the token names added to the first
    tokenizer (multi-vector tokens as token, token_1, ...)."""
    pairs = [(comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)]
    pairs = pairs[:len(comps.text_encoders)]
    added = []
    for (tokenizer, text_encoder), embeds in zip(pairs, formats.read_init_embeddings(path, len(pairs))):
        width = text_encoder.get_input_embeddings().embedding_dim
        rows = {}
        for token, vectors in embeds.items():
            if vectors.shape[-1] != width:
                raise UserError(f"--init-embeddings {path}: {token!r} has {vectors.shape[-1]}-wide vectors but "
                                f"this text encoder's are {width}-wide; use embeddings trained on this model")
            names = token_names(token, len(vectors))
            vocab = tokenizer.get_vocab()
            clash = [n for n in names if n in vocab or n + "</w>" in vocab]
            if clash:
                raise UserError(f"--init-embeddings {path}: token {clash[0]!r} is already in the tokenizer's "
                                f"vocabulary; rename the token in the file or use another base model")
            if tokenizer.add_tokens(names) != len(names):
                raise UserError(f"--init-embeddings {path}: token {token!r} could not be added to the tokenizer")
            rows.update(zip(names, vectors))
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().requires_grad_(False).weight
        with torch.no_grad():
            for name, vector in rows.items():
                weight[tokenizer.convert_tokens_to_ids(name)] = vector.to(weight.dtype)
        added = added or list(rows)
    return added


def expand_init_tokens(text: str, init_embeddings: str | None) -> str:
    """Write the multi-vector tokens of --init-embeddings as their vector tokens in a prompt."""
    if init_embeddings:
        for token, num_vectors in formats.init_tokens(init_embeddings).items():
            text = expand_token(text, token, num_vectors)
    return text


class LoRA(Method):
    name = "lora"
    defaults = dict(lr=1e-4, max_steps=1000, weight_decay=1e-2)
    stop = StopPreset(440, 0.4, 1000, 200)  # the DVAR paper's DreamBooth-LoRA setting
    export_formats = ("kohya", "a1111")
    export_hints = {"a1111": "; train with --train-token to learn one, or use --format kohya"}
    families = ("sd1", "sd2", "sdxl")

    @classmethod
    def check(cls, cfg):
        if cfg.lora_init not in INITS:
            raise UserError(f"--lora-init {cfg.lora_init!r} is not one of {', '.join(INITS)}")
        if cfg.train_token:
            refuse_one_token_for_concepts(cfg, "lora --train-token")

    @property
    def trains_text_encoder(self):
        return self.cfg.train_text_encoder or self.cfg.train_token

    def prompt(self, text):
        return expand_init_tokens(text, self.cfg.init_embeddings)

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        if cfg.init_embeddings:  # e.g. two_stage's stage 2: the stage-1 token, frozen
            add_frozen_embeddings(comps, cfg.init_embeddings)
        self.unet_layers = inject_lora(comps.unet, UNET_TARGETS, cfg.lora_rank, cfg.lora_alpha, cfg.lora_init)
        self.text_layers = (inject_lora(comps.text_encoder, TEXT_TARGETS, cfg.lora_rank, cfg.lora_alpha,
                                        cfg.lora_init)
                            if cfg.train_text_encoder else {})
        # SDXL's second text encoder, LoRA'd like the first (its layers get the generator's next numbers)
        self.text_layers_2 = (inject_lora(comps.text_encoder_2, TEXT_TARGETS, cfg.lora_rank, cfg.lora_alpha,
                                          cfg.lora_init)
                              if cfg.train_text_encoder and comps.text_encoder_2 is not None else {})
        self.embedding = (add_tokens(comps.tokenizer, comps.text_encoder, cfg.token, 1,
                                     cfg.initializer or cfg.class_word or None) if cfg.train_token else None)
        self.embedding_2 = (add_tokens(comps.tokenizer_2, comps.text_encoder_2, cfg.token, 1,
                                       cfg.initializer or cfg.class_word or None)
                            if cfg.train_token and comps.text_encoder_2 is not None else None)

    def _groups(self) -> dict[str, dict]:
        """{file prefix: {module path: LoRALinear}}; text_encoder_2 only on SDXL."""
        groups = {"unet": self.unet_layers, "text_encoder": self.text_layers}
        if self.comps.text_encoder_2 is not None:
            groups["text_encoder_2"] = self.text_layers_2
        return groups

    def _tokens(self) -> list:
        """--train-token's embeddings, one per text encoder (none without it)."""
        return [e for e in (self.embedding, self.embedding_2) if e is not None]

    def _lora_params(self):
        return [p for layers in self._groups().values() for layer in layers.values()
                for p in (layer.lora_A, layer.lora_B)]

    def param_groups(self):
        groups = [{"params": self._lora_params()}]
        if self.embedding is not None:
            groups.append({"params": [e.new for e in self._tokens()], "lr": self.cfg.token_lr or 5e-3,
                           "weight_decay": 0.0})
        return groups

    def trainable_state(self):
        state = {}
        for prefix, layers in self._groups().items():
            for path, layer in layers.items():
                state[f"{prefix}.{path}.lora_A"] = layer.lora_A
                state[f"{prefix}.{path}.lora_B"] = layer.lora_B
        if self.embedding is not None:
            state["token_embedding"] = self.embedding.new
        if self.embedding_2 is not None:
            state["token_embedding_2"] = self.embedding_2.new
        return state

    def save(self, out: Path):
        formats.save_lora(out / formats.LORA_FILE, self._groups(), self.cfg, family=self.comps.family)
        files = [formats.LORA_FILE]
        if self.cfg.init_embeddings:  # the frozen tokens the LoRA was trained with travel with it
            shutil.copyfile(Path(self.cfg.init_embeddings).expanduser(), out / formats.INIT_FILE)
            files.append(formats.INIT_FILE)
        if self.embedding is not None:
            formats.save_token_embedding(out / formats.TI_FILE, self.cfg.token, [e.new for e in self._tokens()],
                                         self.cfg)
            files.append(formats.TI_FILE)
        return files
