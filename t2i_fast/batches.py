"""Training batches drawn from the concept images and prompts, through the caches when they are on.

All randomness comes from one CPU torch.Generator (item, augmentation variant, prompt, latent sample,
noise, timestep, in that order), so a run is reproducible on any device and the stream can be saved and
restored for resume. Cached and uncached paths consume the stream identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ConceptImages, LatentCache, TextCache, encode_distribution, sample_latents, tokenize


@dataclass
class Batch:
    """latents, noise: (B, C, h, w) float32; timesteps: (B,) long; text: (B, L, D) cached features or None,
    in which case input_ids (B, L) are encoded by the method every step."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor | None
    input_ids: torch.Tensor | None
    mask: torch.Tensor | None = None


class BatchSource:
    def __init__(self, images: ConceptImages, prompts: list[str], comps, device: torch.device,
                 latent_cache: LatentCache | None = None, text_cache: TextCache | None = None):
        self.images = images
        self.prompts = prompts
        self.comps = comps
        self.device = device
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.num_train_timesteps = comps.scheduler.config.num_train_timesteps

    def draw_items(self, generator: torch.Generator, batch_size: int) -> list[tuple[int, int, int]]:
        """(image, variant, prompt) indices, uniformly at random."""
        img = torch.randint(len(self.images), (batch_size,), generator=generator)
        var = torch.randint(self.images.num_variants, (batch_size,), generator=generator)
        prm = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        return list(zip(img.tolist(), var.tolist(), prm.tolist()))

    def latent_distribution(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent_cache is not None:
            pairs = [self.latent_cache.get(i, v) for i, v, _ in items]
        else:  # what the diffusers scripts do: run the VAE on every step's pixels
            pairs = [tuple(t[0].cpu() for t in encode_distribution(self.comps.vae, self.images.pixels(i, v)[None]))
                     for i, v, _ in items]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])

    def text_for(self, items) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.text_cache is not None:
            return torch.stack([self.text_cache.get(p) for _, _, p in items]).to(self.device), None
        return None, tokenize(self.comps.tokenizer, [self.prompts[p] for _, _, p in items]).to(self.device)

    def make(self, items, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> Batch:
        mean, std = self.latent_distribution(items)
        latents = sample_latents(mean, std, self.comps.vae.config, generator)
        noise = torch.randn(latents.shape, generator=generator)
        if timesteps is None:
            timesteps = torch.randint(self.num_train_timesteps, (len(items),), generator=generator)
        text, ids = self.text_for(items)
        return Batch(latents.to(self.device), noise.to(self.device), timesteps.to(self.device), text, ids)

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        return self.make(self.draw_items(generator, batch_size), generator)
