"""Custom Diffusion (Kumari et al. 2023): train the cross-attention K/V projections (optionally Q and the
output projection too) of every transformer block, plus one modifier token per concept (`<new1>`, ...).

The trained weights live in diffusers' Custom Diffusion attention processors on each `attn2`, so the
state_dict keys are diffusers' own (`...attn2.processor.to_k_custom_diffusion.weight`) and the saved file
loads with diffusers' code (`pipe.unet.load_attn_procs(run, weight_name=CD_FILE, _pipeline=pipe)`). K/V
of the start-of-text token are detached inside the processor. The
processor is t2i_fast.nn.attention.FastCustomDiffusionAttnProcessor (fused attention) with kernels on,
diffusers' CustomDiffusionAttnProcessor2_0 with kernels off.

Files: `pytorch_custom_diffusion_weights.safetensors` (full weights, as diffusers' save_attn_procs writes
them), one `<token>.safetensors` {token: (1, dim)} per modifier token (as diffusers' script writes them),
and with --compress-svd F also `pytorch_custom_diffusion_weights_svd.safetensors`: the deltas W - W0 as
U (out, r), V (r, in) factors, keeping the top singular values up to the fraction F of their sum.

The files and processors themselves (reading, installing, compressing) are in cd_files.py, which sampling
and merge share without importing this method.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .. import formats
from ..cd_files import (CD_FILE, CD_SVD_FILE, base_fingerprint, cross_attention_modules, placeholders,
                        processor_class, save_compressed, token_file)
from ..data import format_prompt
from ..errors import UserError
from ..stopping import StopPreset
from .base import Method
from .tokens import add_token_set

FREEZE_MODELS = ("crossattn_kv", "crossattn")
RARE_LETTERS = "bcdfghjklmnpqrstvwxz"  # consonants: three of them spell no common word


def rare_initializer(token: str) -> str:
    """The rare three-letter word a modifier token starts from (diffusers' script uses "ktn", "pll", "ucd" by the
    token's index in the run), chosen by the token string itself: runs trained apart then start their different
    tokens from different embeddings (by index they would all start from "ktn" and could end too alike to
    merge), and a token starts from the same word in every run."""
    digest = hashlib.sha256(token.encode()).digest()
    return "".join(RARE_LETTERS[b % len(RARE_LETTERS)] for b in digest[:3])


def make_processor(attn: nn.Module, train_q_out: bool, fast: bool) -> nn.Module:
    """A Custom Diffusion processor for `attn` whose weights start as copies of attn's (fp32)."""
    proc = processor_class(fast)(train_kv=True, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
                                 cross_attention_dim=attn.to_k.in_features,
                                 out_bias=attn.to_out[0].bias is not None)
    proc.to(attn.to_k.weight.device)  # first, so that the copies below stay on it (meta included: memplan)
    with torch.no_grad():
        proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
        proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
        if train_q_out:
            proc.to_q_custom_diffusion.weight.copy_(attn.to_q.weight)
            proc.to_out_custom_diffusion[0].weight.copy_(attn.to_out[0].weight)
            if attn.to_out[0].bias is not None:
                proc.to_out_custom_diffusion[0].bias.copy_(attn.to_out[0].bias)
    return proc.to(attn.to_k.weight.device, torch.float32)


class CustomDiffusion(Method):
    name = "custom_diffusion"
    trains_text_encoder = True  # the modifier rows of the input embedding train: prompts are encoded every step
    uses_prior = True
    rescale_augment = True
    # the paper and diffusers' script: lr 1e-5 x batch size (scale_lr); our default batch is 1, so 1e-5
    defaults = dict(lr=1e-5, max_steps=500, weight_decay=1e-2)
    stop = StopPreset(180, 0.15, 500, 100)  # the DVAR paper's
    saves = "Custom Diffusion attention weights that neither layout holds; load them with t2i-fast sample"
    families = ("sd1", "sd2", "sdxl")

    @classmethod
    def check(cls, cfg):
        if cfg.freeze_model not in FREEZE_MODELS:
            raise UserError(f"--freeze-model {cfg.freeze_model!r} is not one of {', '.join(FREEZE_MODELS)}")
        if not 0.0 <= cfg.compress_svd < 1.0:
            raise UserError(f"--compress-svd {cfg.compress_svd} must be in [0, 1) (0 disables, 0.6 is the paper's)")

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        concepts = self.training_concepts
        self.tokens = [c.token for c in concepts]
        # what the merge needs to rebuild each concept's text features: its token, class word and prompts
        templates = self.prompt_templates(cfg)
        self.concepts = [{"token": c.token, "class_word": c.class_word,
                          "prompts": [format_prompt(t, c.token, c.class_word) for t in templates]} for c in concepts]
        specs = [(t, 1, cfg.initializer or rare_initializer(t)) for t in self.tokens]
        flag = "--concepts token" if cfg.concepts else "--token"
        self.embedding = add_token_set(comps.tokenizer, comps.text_encoder, specs, flag)
        # SDXL: each modifier token also gets a row in the second text encoder, trained alike
        self.embedding_2 = (add_token_set(comps.tokenizer_2, comps.text_encoder_2, specs, flag)
                            if comps.text_encoder_2 is not None else None)
        train_q_out = cfg.freeze_model == "crossattn"
        comps.unet.requires_grad_(False)
        # what the saved file records of its base model; the memory planner's meta weights have no values
        self.fingerprint = base_fingerprint(comps.unet) if comps.unet.device.type != "meta" else None
        self.processors: dict[str, nn.Module] = {}
        for key, attn in cross_attention_modules(comps.unet).items():
            proc = make_processor(attn, train_q_out, fast=cfg.kernels)
            attn.set_processor(proc)
            self.processors[key] = proc
        if not self.processors:
            raise UserError(f"model {cfg.model} has no cross-attention layers to train")
        # the base weights, kept only for the compressed deltas
        self.base = ({k: v.detach().clone() for k, v in self.processor_state().items()}
                     if cfg.compress_svd > 0 else None)

    def processor_state(self) -> dict[str, torch.Tensor]:
        """{diffusers file key: trained Parameter}."""
        return {f"{key}.{name}": p for key, proc in self.processors.items() for name, p in proc.named_parameters()}

    def param_groups(self):
        return [{"params": list(self.processor_state().values())},
                {"params": [e.new for e in self.embeddings], "lr": self.cfg.token_lr or self.cfg.lr}]

    @property
    def embeddings(self) -> list:
        return [e for e in (self.embedding, self.embedding_2) if e is not None]

    def train(self):
        for proc in self.processors.values():
            proc.train()

    def trainable_state(self):
        state = {f"unet.{k}": v for k, v in self.processor_state().items()}
        state["token_embedding"] = self.embedding.new
        if self.embedding_2 is not None:
            state["token_embedding_2"] = self.embedding_2.new
        return state

    def token_vectors(self) -> dict[str, list[torch.Tensor]]:
        """{token: its vector in each text encoder}."""
        return {t: [e.new[e.token_rows[t]] for e in self.embeddings] for t in self.tokens}

    def save(self, out: Path):
        cfg = self.cfg
        extra = {"base_fingerprint": self.fingerprint, "tokens": self.tokens, "freeze_model": cfg.freeze_model,
                 "concepts": self.concepts}
        weights = {k: v.detach().float() for k, v in self.processor_state().items()}
        formats.atomic_save({**weights, **placeholders(self.comps.unet)}, out / CD_FILE,
                            formats.adapter_metadata(cfg, "custom_diffusion", extra))
        files = [CD_FILE]
        for token, vectors in self.token_vectors().items():  # on SDXL the {"clip_l", "clip_g"} file
            formats.save_token_embedding(out / token_file(token), token, vectors, cfg)
            files.append(token_file(token))
        if self.base is not None:
            save_compressed(out / CD_SVD_FILE, weights, self.base, cfg.compress_svd, cfg)
            files.append(CD_SVD_FILE)
        return files
