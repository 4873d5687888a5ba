"""The parts of E4T (Gal et al. 2023, "Encoder-based Domain Tuning") that domain pre-training and per-concept
tuning share: the weight offsets, the encoder, the image features it reads, and the domain file.

- **Weight offsets.** Every attention block's to_q / to_k / to_v becomes `W = W0 ⊙ (1 + B A)` (OffsetLinear):
  a low-rank, elementwise *relative* change of the frozen weight, B starting at zero, L2-regularised.
- **Image features** (image_features): the encoder never sees the image through the toy evaluator's image
  encoder (that would score the method with its own features). It reads the frozen model itself: the VAE
  latent of the image (average-pooled to 4 x 4, flattened) and the UNet encoder's features of that latent
  noised to t = FEATURE_T with fixed noise, under the empty prompt (each down block's output and the mid
  block's output, mean-pooled over H x W, concatenated). Where a CLIP vision folder is given
  (pretrain-e4t --image-encoder, e4t_image_encoder.py), its image embedding joins them, as in the paper.
  Computed with the base UNet, before any offset, so the features are a fixed function of the image: they
  are computed once per image.
- **Encoder** (EncoderHead): an MLP from those features to an offset δ of the class word's embedding;
  the concept's word embedding is `v* = e_class + scale · δ` (scale 0.1, the paper's), and it replaces the
  placeholder token's input embedding in the frozen text encoder (EncodedToken). The last layer starts at
  zero, so v* starts as the class word.
- **The domain file** `e4t_domain.safetensors`: the pre-trained encoder head and offsets, with the
  settings and the base model's fingerprint in its metadata, so that a domain made for another model is
  refused by name.

Unlike the paper, which recomputes v* from the image at every denoising step, v* is computed once from the
(fixed) features of the one concept image, so a tuned concept stores v* and its offsets and samples without
its image.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .cd_files import base_fingerprint, same_base
from .data import encode_distribution, tokenize
from .e4t_image_encoder import clip_features
from .errors import UserError
from .methods.tokens import WrappedEmbedding, word_embedding
from .nn.lora import WrappedLinear

DOMAIN_FILE = "e4t_domain.safetensors"
DOMAIN_KIND = "e4t_domain"
PROJECTIONS = ("to_q", "to_k", "to_v")
FEATURE_T = 200          # timestep of the noised latent whose UNet features the encoder reads (of 1000)
FEATURE_NOISE_SEED = 0   # the fixed noise of that latent: the features are a function of the image alone
POOLED_LATENT = 4        # the VAE latent is average-pooled to 4 x 4 before it joins the features
SCALE = 0.1              # v* = e_class + SCALE * δ (the paper's s)
HIDDEN = 256             # width of the encoder's hidden layer
# The loss adds DELTA_WEIGHT ‖δ‖² + OFFSET_WEIGHT mean (B A)². The penalty is on δ, not on v* as in the paper's
# λ‖v*‖²: v* = e_class + SCALE δ, and pulling v* towards zero would pull the concept away from its class word;
# ‖δ‖² keeps it near the class word instead.
DELTA_WEIGHT = 1e-3
OFFSET_WEIGHT = 1e-2


class OffsetLinear(WrappedLinear):
    """A frozen nn.Linear with the weight offset W = W0 ⊙ (1 + B A); B (out, r) starts at zero, so the layer
    starts out exactly as `base`. Plain PyTorch: on the small layers it wraps, the product is cheap."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator | None = None):
        super().__init__(base.requires_grad_(False))
        device = base.weight.device
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight * (1 + self.delta().to(self.base.weight.dtype))
        return F.linear(x, w, self.base.bias)


def attention_projections(unet: nn.Module) -> dict[str, nn.Module]:
    """{path: to_q / to_k / to_v layer} of every attention block of the UNet, in module order."""
    from diffusers.models.attention_processor import Attention

    return {f"{name}.{proj}": getattr(m, proj) for name, m in unet.named_modules() if isinstance(m, Attention)
            for proj in PROJECTIONS}


def install_offsets(unet: nn.Module, rank: int, seed: int = 0) -> dict[str, OffsetLinear]:
    """Wrap every attention projection in an OffsetLinear (B = 0: the UNet is unchanged until they train)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, linear in attention_projections(unet).items():
        if isinstance(linear, OffsetLinear):
            raise UserError("this UNet holds E4T offsets already; start from a freshly loaded model")
        layers[path] = OffsetLinear(linear, rank, gen)
        unet.set_submodule(path, layers[path])
    return layers


def offset_state(layers: dict[str, OffsetLinear]) -> dict[str, torch.Tensor]:
    return {f"{path}.{ab}": getattr(layer, ab) for path, layer in layers.items() for ab in ("lora_A", "lora_B")}


def penalty(delta: torch.Tensor | None, layers: dict[str, OffsetLinear]) -> torch.Tensor | None:
    """The L2 regulariser: DELTA_WEIGHT ‖δ‖² (mean over the batch) + OFFSET_WEIGHT times the mean over layers
    of the mean squared relative offset (B A)²; None where neither trains."""
    terms = [DELTA_WEIGHT * delta.pow(2).sum(-1).mean()] if delta is not None else []
    if layers:
        terms.append(OFFSET_WEIGHT * torch.stack([layer.delta().pow(2).mean() for layer in layers.values()]).mean())
    return sum(terms) if terms else None


@torch.no_grad()
def fold_offsets(unet: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> int:
    """W0 <- W0 ⊙ (1 + B A) in place for every layer in `tensors` ({layer}.lora_A / .lora_B): how sampling
    applies saved offsets (the result is a plain diffusers UNet). A UserError where they do not fit."""
    layers = attention_projections(unet)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))})
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise UserError(f"{path} has offsets for {unknown[0]}, which this model lacks: it was made for another "
                        f"base model; load it with the model it was trained on")
    for name in names:  # every layer is checked before the first one changes
        linear, a, b = layers[name], tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise UserError(f"{path} lacks half of the offset of {name}: the file is incomplete; train it again")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features \
                or a.shape[0] != b.shape[1]:
            raise UserError(f"{path}: {name} has shapes {tuple(a.shape)}, {tuple(b.shape)}, which do not fit this "
                            f"model's layer {tuple(linear.weight.shape)}; load it with the model it was trained on")
    for name in names:
        w = layers[name].weight
        w.mul_(1 + (tensors[f"{name}.lora_B"].float() @ tensors[f"{name}.lora_A"].float()).to(w.device, w.dtype))
    return len(names)


class EncoderHead(nn.Module):
    """Image features (B, F) -> δ (B, D); the last layer starts at zero (δ = 0: v* starts as the class word)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class EncodedToken(WrappedEmbedding):
    """The text encoder's input embedding with the placeholder token's row taken from `vectors()`, a (B, D) or
    (1, D) tensor computed at each forward (so gradients reach the encoder); every other row is the frozen
    embedding."""

    def __init__(self, base: nn.Embedding, token_id: int, vectors):
        super().__init__(base)
        self.token_id = token_id
        self.vectors = vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base(input_ids)
        v = self.vectors().to(emb.dtype)[:, None, :]  # (B or 1, 1, D)
        return torch.where((input_ids == self.token_id)[..., None], v, emb)


def add_encoded_token(tokenizer, text_encoder, token: str, vectors) -> EncodedToken:
    """Add `token` to the tokenizer and give it the row `vectors()` in the text encoder."""
    from .methods.tokens import add_tokens

    added = add_tokens(tokenizer, text_encoder, token, 1, None)  # the tokenizer side, with its checks
    patched = EncodedToken(added.base, added.first_id, vectors)
    text_encoder.set_input_embeddings(patched)
    return patched


def class_embedding(tokenizer, text_encoder, word: str) -> torch.Tensor:
    """(D,) e_class: the mean input embedding of the class word's tokens (fp32, a copy)."""
    return word_embedding(tokenizer, text_encoder.get_input_embeddings(), word,
                          f"class word {word!r} tokenizes to nothing; pass a word the model knows").clone()


@torch.no_grad()
def image_features(comps, pixels: torch.Tensor, batch: int = 64,
                   image_encoder: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), VAE latent mean (N, C, h, w)) of (N, 3, R, R) pixels in [-1, 1], from the frozen
    model, and from the CLIP vision model `image_encoder` where one is given (see the module docstring). The
    UNet must not hold offsets yet."""
    unet, vae, scheduler = comps.unet, comps.vae, comps.scheduler
    device, dtype = unet.device, next(unet.parameters()).dtype
    te = comps.text_encoder
    null_text = te(tokenize(comps.tokenizer, [""]).to(te.device))[0].to(device, dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).float().mean((2, 3)))

    hooks = [block.register_forward_hook(keep) for block in (*unet.down_blocks, unet.mid_block)]
    features, means = [], []
    try:
        for i in range(0, len(pixels), batch):
            mean, _ = encode_distribution(vae, pixels[i:i + batch])
            latents = (mean - shift) * vae.config.scaling_factor
            gen = torch.Generator().manual_seed(FEATURE_NOISE_SEED)
            noise = torch.randn(latents.shape[1:], generator=gen).to(latents.device).expand_as(latents)
            t = torch.full((len(latents),), FEATURE_T, dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, t).to(device, dtype)
            captured.clear()
            unet(noisy, t.to(device), null_text.expand(len(latents), -1, -1))
            pooled = F.adaptive_avg_pool2d(latents, POOLED_LATENT).flatten(1).to(device)
            extra = [clip_features(image_encoder, pixels[i:i + batch]).to(device)] if image_encoder is not None else []
            features.append(torch.cat([*captured, pooled, *extra], dim=1).float())
            means.append(mean.float())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(features), torch.cat(means)


# ----------------------------------------------------------------------------------------- the domain file
def domain_path(domain: str | Path) -> Path:
    """The domain file itself, or DOMAIN_FILE inside a folder."""
    path = Path(domain).expanduser()
    return path / DOMAIN_FILE if path.is_dir() else path


def save_domain(path: Path, head: EncoderHead, layers: dict[str, OffsetLinear], info: dict) -> None:
    tensors = {f"encoder.{k}": v for k, v in head.state_dict().items()}
    tensors.update({k: v.detach().float() for k, v in offset_state(layers).items()})
    formats.atomic_save(tensors, path, formats.adapter_metadata(None, DOMAIN_KIND, info))


def read_domain(domain: str | Path, comps, model_name: str) -> tuple[dict, dict, dict]:
    """(encoder head state, offsets {layer.lora_A/B: tensor}, info) of a domain file made for this model; a
    one-line UserError for a missing file, one of another kind, or one made for another base model."""
    path = domain_path(domain)
    if not path.is_file():
        raise UserError(f"--domain {domain}: no {DOMAIN_FILE} there; make one with `t2i-fast pretrain-e4t "
                        f"--model M --domain DIR --class-word W --out D`")
    tensors, info = formats.read_adapter(path, DOMAIN_KIND, fix="make one with `t2i-fast pretrain-e4t`")
    if comps.unet.device.type != "meta" and not same_base(info.get("fingerprint"), base_fingerprint(comps.unet)):
        raise UserError(f"{path} was pre-trained for the model {info.get('model', '?')}, not for {model_name}; "
                        f"pass the domain made for {model_name} (or make one with `t2i-fast pretrain-e4t --model "
                        f"{model_name}`)")
    head = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    offsets = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    return head, offsets, info


def model_info(comps, model_name: str) -> dict:
    """What a domain file records of its base model (checked by read_domain)."""
    return {"model": str(model_name), "fingerprint": base_fingerprint(comps.unet)}
