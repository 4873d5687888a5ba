"""E4T (Gal et al. 2023): a new concept of a pre-trained domain from ONE image in 5-15 tuning steps.

`t2i-fast pretrain-e4t` (e4t_pretrain.py) trains, once per domain and model, an encoder (image features ->
an offset δ of the class word's embedding) and weight offsets W = W0 ⊙ (1 + B A) on every attention block's
to_q / to_k / to_v, over many concepts of the domain; the UNet, VAE and text encoder stay frozen. This
method then tunes both on one image of a new concept for a few steps, starting from the domain file
(--domain): the concept's word embedding is v* = e_class + 0.1 δ(image), placed at the token's row.

What trains: the encoder head and the offsets (so v* trains through the head: the image's features are
fixed). Loss: the noise-prediction loss plus e4t_domain.penalty, an L2 penalty on δ and on the offsets
(its comment says why on δ rather than on v*).

More than one image in --images: the first (in file-name order) is used, and the run says so. A domain
pre-trained with a CLIP image backbone (pretrain-e4t --image-encoder) reads the image through the same
encoder, from the folder its file records or from --image-encoder (e4t_image_encoder.py).

Saved: `e4t_weights.safetensors` with the tuned offsets ({layer}.lora_A / .lora_B) and v* (token_embedding),
the config and the token in its metadata. Sampling adds v* with diffusers' load_textual_inversion and folds
the offsets into the UNet's weights, so the image is not needed again (the paper recomputes v* from the
image at every denoising step; with features fixed per image that would give the same v*).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist, formats
from ..adapter_files import check_width
from ..data import ConceptImages, list_images
from ..e4t_domain import (HIDDEN, SCALE, EncoderHead, add_encoded_token, class_embedding, fold_offsets,
                          image_features, install_offsets, offset_state, penalty, read_domain)
from ..e4t_image_encoder import encoder_for_domain
from ..errors import UserError
from ..stopping import StopPreset
from .base import Method, refuse_template_without_token

FILE = "e4t_weights.safetensors"
KIND = "e4t"


class E4T(Method):
    name = "e4t"
    trains_text_encoder = True  # the token's row comes from the encoder each step: prompts are encoded each step
    uses_prior = False
    images_used = 1
    # a fixed few steps: no early stopping (its probe and plot would cost more than the steps)
    defaults = dict(lr=1e-4, max_steps=15, weight_decay=0.0, early_stop="none")
    stop = StopPreset(10, 0.4, 15, 15)  # used only with --early-stop dvar or few
    saves = "E4T offsets and a word embedding, which neither layout holds; load them with t2i-fast sample"

    #: ablation switches (recorded in the saved file)
    offsets = True  # False: no weight offsets, neither the domain's nor tuned ones
    encoder = True  # False: v* is a free vector from the class word's embedding, tuned directly

    @classmethod
    def check(cls, cfg):
        if not cfg.domain:
            raise UserError("--method e4t needs --domain D, the folder `t2i-fast pretrain-e4t --model M --domain "
                            "DIR --class-word W --out D` wrote")
        refused = [("--concepts", cfg.concepts, "it learns one concept from one image per run"),
                   ("--train-text-encoder", cfg.train_text_encoder, "only the token's embedding trains there"),
                   ("--init-embeddings", cfg.init_embeddings, "it learns its own token"),
                   ("--num-vectors", cfg.num_vectors != 1, "the encoder makes one vector")]
        for flag, value, why in refused:
            if value:
                raise UserError(f"{flag} is not supported by e4t ({why}); leave it out or use --method lora")
        refuse_template_without_token(cfg, "the encoder's word would never be seen")

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        head_state, domain_offsets, info = read_domain(cfg.domain, comps, cfg.model)
        self.info = info
        folder = self.training_concepts[0].images
        found = len(list_images(folder))
        images = ConceptImages(folder, cfg.resolution or comps.native_resolution, center_crop=True,
                               random_flip=False, first=1)
        if found > 1 and dist.is_main() and comps.unet.device.type != "meta":  # not for the planner's pass
            print(f"e4t tunes on one image: using {images.files[0].name}, the first of the {found} in {folder}",
                  file=sys.stderr)
        device = comps.unet.device
        pixels = images.pixels(0, 0)[None]
        if device.type == "meta":  # the memory planner's pass: the image encoder runs once, before training
            features, _ = image_features(comps, pixels)
            if info.get("image_encoder_dim"):
                features = torch.cat([features, features.new_zeros(1, info["image_encoder_dim"])], dim=1)
        else:
            clip = encoder_for_domain(info, cfg.image_encoder, cfg.domain, device)
            features, _ = image_features(comps, pixels, image_encoder=clip)
            del clip
        self.features = features.to(device)
        self.e_class = class_embedding(comps.tokenizer, comps.text_encoder, info["class_word"]).to(device)
        self.head = EncoderHead(features.shape[1], self.e_class.shape[0], info.get("hidden", HIDDEN)).to(device)
        if device.type != "meta":  # the memory planner's weights have no values to load
            self.head.load_state_dict(head_state)
        self.free = nn.Parameter(self.e_class[None].clone()) if not self.encoder else None
        self.token = add_encoded_token(comps.tokenizer, comps.text_encoder, cfg.token, self.vector)
        comps.unet.requires_grad_(False)
        self.layers = install_offsets(comps.unet, info["rank"], cfg.seed) if self.offsets else {}
        with torch.no_grad():
            for name, tensor in offset_state(self.layers).items():
                tensor.copy_(domain_offsets[name])

    def delta(self) -> torch.Tensor:
        return self.head(self.features)

    def vector(self) -> torch.Tensor:
        """v*, (1, D)."""
        return self.free if self.free is not None else self.e_class + self.info.get("scale", SCALE) * self.delta()

    def regularizer(self):
        return penalty(self.delta() if self.free is None else None, self.layers)

    def param_groups(self):
        groups = [{"params": [self.free] if self.free is not None else list(self.head.parameters())}]
        if self.layers:
            groups.append({"params": list(offset_state(self.layers).values())})
        return groups

    def train(self):
        self.head.train()

    def trainable_state(self):
        state = ({"token_embedding": self.free} if self.free is not None else
                 {f"encoder.{k}": p for k, p in self.head.named_parameters()})
        state.update(offset_state(self.layers))
        return state

    def save(self, out: Path):
        cfg = self.cfg
        tensors = {k: v.detach().float() for k, v in offset_state(self.layers).items()}
        with torch.no_grad():
            tensors["token_embedding"] = self.vector().detach().float()
        extra = {"token": cfg.token, "domain_class_word": self.info["class_word"], "offsets": bool(self.layers),
                 "encoder": self.free is None, "rank": self.info["rank"], "domain_model": self.info.get("model")}
        formats.atomic_save(tensors, out / FILE, formats.adapter_metadata(cfg, KIND, extra))
        return [FILE]

    @classmethod
    def load(cls, pipe, folder, names):
        if FILE not in names:
            return super().load(pipe, folder, names)
        path = Path(folder) / FILE
        tensors, info = formats.read_adapter(path, KIND, "token_embedding")
        token = info["token"]
        if token in pipe.tokenizer.get_vocab():
            raise UserError(f"{path}: this pipeline knows {token} already (an e4t adapter loaded before?); load "
                            f"each into a fresh pipeline")
        vectors = tensors["token_embedding"]
        check_width(pipe, path, token, vectors)
        offsets = {k: v for k, v in tensors.items() if k != "token_embedding"}
        fold_offsets(pipe.unet, offsets, path)  # checks every layer before the first token is added
        pipe.load_textual_inversion({token: vectors}, token=token)
        return [FILE]
