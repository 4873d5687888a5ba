"""SDXL's conditioning: two text encoders, a pooled text embedding and the micro-conditioning time ids.

What the SDXL UNet reads besides the noisy latents and the timestep:
  encoder_hidden_states  (B, 77, D1 + D2): the penultimate hidden states of text encoder 1 (CLIPTextModel,
                         D1 wide) and of text encoder 2 (CLIPTextModelWithProjection, D2 wide), concatenated
                         on the last dim, exactly as StableDiffusionXLPipeline.encode_prompt computes them
  text_embeds            (B, P): the pooled, projected output of text encoder 2 (its text_embeds)
  time_ids               (B, 6): original size (h, w), crop top-left (top, left), target size (h, w)

The crop of an image resized to the training resolution and center-cropped is computed the way diffusers'
train_dreambooth_lora_sdxl.py does (resize the shorter side to the resolution as torchvision does, then
round((side - resolution) / 2)); t2i_fast crops in source pixels first and resizes after, which gives the same
pixels up to interpolation, so only the coordinates need diffusers' arithmetic. A flip leaves the crop as it
is, as in that script.

With aspect-ratio buckets (buckets.py) the target size is the image's bucket, and the crop top-left is the
crop box's corner in the frame where that box is resized to the bucket (each axis scaled by bucket side / box
side): the image resized to cover the bucket, as kohya's SDXL trainer computes it.
"""
from __future__ import annotations

import torch

from .data import ConceptImages, tokenize


def tokenize_pair(tokenizers, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids of each tokenizer (SDXL's second one pads with "!" rather than the end token)."""
    return tokenize(tokenizers[0], prompts), tokenize(tokenizers[1], prompts)


def encode_prompt(text_encoders, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D1 + D2) penultimate hidden states of both encoders concatenated, and (B, P) the pooled
    projection of the second, as StableDiffusionXLPipeline.encode_prompt (clip_skip None). Gradients flow where
    the encoders train (LoRA, new tokens); the outputs keep the encoders' dtype."""
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # only CLIPTextModelWithProjection's first output is pooled
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


class SDXLTextCache:
    """Both encoders' features of every prompt, for frozen text encoders: features (P, L, D1 + D2) and pooled
    (P, P_dim), fp32 on the CPU. Same interface as data.TextCache, plus `pooled`."""

    def __init__(self, prompts: list[str], tokenizers, text_encoders):
        self.prompts = list(prompts)
        ids = tokenize_pair(tokenizers, self.prompts)
        features, pooled = [], []
        with torch.no_grad():
            for i in range(len(self.prompts)):  # one prompt per call: the uncached path's batch-of-one numerics
                h, p = encode_prompt(text_encoders, [x[i:i + 1] for x in ids])
                features.append(h.float().cpu())
                pooled.append(p.float().cpu())
        self.features = torch.cat(features)
        self.pooled = torch.cat(pooled)

    def get(self, index: int) -> torch.Tensor:
        return self.features[index]


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) after torchvision's Resize(resolution) (shorter side to `resolution`, the longer truncated)."""
    if width <= height:
        return int(resolution * height / width), resolution
    return resolution, int(resolution * width / height)


def crop_top_left(images: ConceptImages, index: int, variant: int) -> tuple[int, int]:
    """(top, left) of the crop of image `index` under `variant`, in the frame of the image resized so that the
    crop is resolution pixels wide (as wide as the bucket, with buckets), as SDXL's crops_coords_top_left is
    defined."""
    r = images.resolution
    v = images.variant(index, variant)
    width, height = images.images[index].size
    if images.bucketed:  # the box (left, top, size wide, height high) becomes the bucket (w, h)
        bw, bh = images.sizes[index]
        return int(round(v.top * bh / v.height)), int(round(v.left * bw / v.size))
    if images.center_crop:  # diffusers' arithmetic, Python's round included
        h, w = resized_size(height, width, r)
        return max(0, int(round((h - r) / 2.0))), max(0, int(round((w - r) / 2.0)))
    scale = r / v.size  # a random crop box (left, top, size) in source pixels
    return int(round(v.top * scale)), int(round(v.left * scale))


def time_ids(images: ConceptImages, index: int, variant: int) -> torch.Tensor:
    """(6,) float32: original size (h, w), crop top-left (top, left), target size (h, w) of one example."""
    width, height = images.images[index].size
    target_w, target_h = images.sizes[index]  # (resolution, resolution) without buckets
    return torch.tensor([height, width, *crop_top_left(images, index, variant), target_h, target_w],
                        dtype=torch.float32)
