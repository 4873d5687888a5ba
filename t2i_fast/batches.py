"""Training batches drawn from the concept images and prompts, through the caches when they are on.

A batch mixes *streams*: one per instance concept (several in multi-concept training) and, with prior
preservation, a class stream that adds as many class examples as there are instance examples, each
weighted by the prior loss weight. An item is (stream, image, variant, prompt); its prompt is the stream's
caption of the image, or one of its templates (with the variant's rescale prefix where the stream asks
for one).

With aspect-ratio buckets (--buckets, buckets.py) every batch holds items of one bucket, so their latents stack.
The bucket is drawn first, weighted by the chance of drawing its images without buckets (each concept 1/K, each
of its images 1/n: for one concept, by its number of images), then the items within it with those weights, so
every image stays as likely as without buckets. Class images are square-cropped by nature (generated or not),
and a bucket may hold no class image at all, so the class items of a batch are drawn as before and cropped to
the batch's bucket: the class stream keeps one center-cropped view (and latent cache) per bucket in use.

All randomness comes from one CPU torch.Generator (items, latent sample, noise, timestep, in that order),
so a run is reproducible on any device and the stream can be saved and restored for resume. Cached and
uncached paths consume the generator identically.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import ConceptImages, LatentCache, TextCache, encode_distribution, sample_latents, tokenize

Size = tuple[int, int]  # a bucket: (width, height) in pixels


@dataclass
class Stream:
    """One source of examples. prompts: templates already formatted for this stream; captions: one prompt
    per image instead (class images with captions); weight: loss weight of its examples; masked: restrict
    the loss to the valid latent region of rescaled variants; prefix: prepend the variant's rescale prefix."""

    images: ConceptImages
    prompts: list[str]
    weight: float = 1.0
    masked: bool = False
    prefix: bool = False
    captions: list[str] | None = None
    latent_cache: LatentCache | None = field(default=None, repr=False)  # of its own images (not the views)

    def prompt(self, image: int, variant: int, template: int) -> str:
        text = self.captions[image] if self.captions else self.prompts[template]
        return (self.images.variant(image, variant).prefix + text) if self.prefix else text

    def all_prompts(self) -> list[str]:
        """Every prompt this stream can produce (for the text cache)."""
        out = []
        for i in range(len(self.images)):
            for v in range(self.images.num_variants):
                for t in range(1 if self.captions else len(self.prompts)):
                    out.append(self.prompt(i, v, t))
        return list(dict.fromkeys(out))


@dataclass
class Batch:
    """latents, noise: (B, C, h, w) float32; timesteps: (B,) long; text: (B, L, D) cached features, or None
    and then input_ids (B, L) are encoded by the method every step; weights: (B,) loss weight per example;
    num_instance: examples that count in the loss normaliser (a rank's slice of a data-parallel batch holds the
    global count / world, a float: distributed.share); mask: (B, 1, h, w) or None. SDXL only (None
    otherwise, sdxl.py): pooled (B, P) cached pooled text embeddings (with text), input_ids_2 (B, L) the second
    tokenizer's ids (with input_ids), time_ids (B, 6) the micro-conditioning of each example."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor | None
    input_ids: torch.Tensor | None
    weights: torch.Tensor | None = None
    num_instance: int | float | None = None
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    input_ids_2: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


class BatchSource:
    """Draws training batches, and owns both caches: the VAE latent distributions of every image variant
    (cache_latents) and the text features of every prompt (cache_text; only for a frozen text encoder)."""

    def __init__(self, streams: list[Stream], comps, device: torch.device, prior: Stream | None = None,
                 cache_latents: bool = True, cache_text: bool = False, progress: bool = False):
        self.streams = list(streams) + ([prior] if prior is not None else [])
        self.num_instance_streams = len(streams)
        self.prior = prior
        self.comps = comps
        self.device = device
        self.sdxl = comps.family == "sdxl"
        prompts = list(dict.fromkeys(p for s in self.streams for p in s.all_prompts())) if cache_text else None
        if cache_text and self.sdxl:
            from .sdxl import SDXLTextCache

            self.text_cache = SDXLTextCache(prompts, (comps.tokenizer, comps.tokenizer_2), comps.text_encoders)
        else:
            self.text_cache = TextCache(prompts, comps.tokenizer, comps.text_encoder) if cache_text else None
        self.prompt_index = {p: i for i, p in enumerate(self.text_cache.prompts)} if self.text_cache else None
        self.pools = bucket_pools(streams)
        # with buckets: the class images cropped to each bucket in use, (view, its latent cache or None)
        self.prior_views: dict[Size, tuple[ConceptImages, LatentCache | None]] = {}
        if prior is not None and self.pools is not None:
            for size in self.pools:
                view = prior.images.cropped_to(size)
                self.prior_views[size] = (view, LatentCache(view, comps.vae, progress) if cache_latents else None)
        if cache_latents:
            for s in self.streams:
                if not (s is prior and self.prior_views):  # the class stream reads its views' caches instead
                    s.latent_cache = LatentCache(s.images, comps.vae, progress=progress)
        self.num_train_timesteps = comps.scheduler.config.num_train_timesteps

    @property
    def images(self) -> ConceptImages:
        """The first instance stream's images (the probe's fixed batch is drawn from it)."""
        return self.streams[0].images

    @property
    def prompts(self) -> list[str]:
        return self.streams[0].prompts

    def _draw(self, generator, stream_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
        items = []
        for s in stream_ids.tolist():
            st = self.streams[s]
            i = int(torch.randint(len(st.images), (1,), generator=generator))
            v = int(torch.randint(st.images.num_variants, (1,), generator=generator))
            t = int(torch.randint(1 if st.captions else len(st.prompts), (1,), generator=generator))
            items.append((s, i, v, t))
        return items

    def _draw_bucketed(self, generator, batch_size: int) -> list[tuple[int, int, int, int]]:
        """batch_size instance items of one bucket: the bucket, then each item's (stream, image) by weight."""
        pools = list(self.pools.values())
        b = int(torch.multinomial(torch.stack([w.sum() for _, w in pools]), 1, generator=generator))
        pool, weights = pools[b]
        items = []
        for p in torch.multinomial(weights, batch_size, replacement=True, generator=generator).tolist():
            s, i = pool[p]
            st = self.streams[s]
            v = int(torch.randint(st.images.num_variants, (1,), generator=generator))
            t = int(torch.randint(1 if st.captions else len(st.prompts), (1,), generator=generator))
            items.append((s, i, v, t))
        return items

    def draw_items(self, generator: torch.Generator, batch_size: int) -> list[tuple[int, int, int, int]]:
        """batch_size instance items (concept chosen uniformly; with buckets, all of one bucket), then as many
        prior items if there is a prior."""
        if self.pools is not None:
            items = self._draw_bucketed(generator, batch_size)
        else:
            items = self._draw(generator, torch.randint(self.num_instance_streams, (batch_size,), generator=generator))
        if self.prior is not None:
            items += self._draw(generator, torch.full((batch_size,), len(self.streams) - 1))
        return items

    def bucket_of(self, items) -> Size:
        """The (width, height) of a batch's instance items (with buckets, they share it)."""
        s, i = next(((s, i) for s, i, *_ in items if s < self.num_instance_streams), items[0][:2])
        return self.streams[s].images.sizes[i]

    def source_of(self, s: int, size: Size) -> tuple[ConceptImages, LatentCache | None]:
        """The images (and latent cache) an item of stream s reads in a batch of bucket `size`: the stream's
        own, or for the class stream with buckets, its view cropped to that bucket."""
        if self.prior_views and self.streams[s] is self.prior:
            return self.prior_views[size]
        return self.streams[s].images, self.streams[s].latent_cache

    def latent_distribution(self, items, kept: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent mean and std of each item. kept: the rows this process trains on (a data-parallel rank's
        slice); the VAE runs on those alone, and the others are zeros, drawn from but never used."""
        pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        size = self.bucket_of(items)
        wanted = range(len(items))[kept] if kept is not None else range(len(items))
        for k, (s, i, v, _) in enumerate(items):
            images, cache = self.source_of(s, size)
            if cache is not None:
                pairs.append(cache.get(i, v))
            elif k in wanted:  # what the diffusers scripts do: run the VAE on every step's pixels
                m, sd = encode_distribution(self.comps.vae, images.pixels(i, v)[None])
                pairs.append((m[0].cpu(), sd[0].cpu()))
            else:
                pairs.append(None)
        shape = next(p[0].shape for p in pairs if p is not None)
        pairs = [p if p is not None else (torch.zeros(shape), torch.zeros(shape)) for p in pairs]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])

    def prompts_for(self, items) -> list[str]:
        return [self.streams[s].prompt(i, v, t) for s, i, v, t in items]

    def text_for(self, items) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        prompts = self.prompts_for(items)
        if self.text_cache is not None:
            return torch.stack([self.text_cache.get(self.prompt_index[p]) for p in prompts]).to(self.device), None
        return None, tokenize(self.comps.tokenizer, prompts).to(self.device)

    def make(self, items, generator: torch.Generator, timesteps: torch.Tensor | None = None,
             kept: slice | None = None) -> Batch:
        """kept: the rows the caller trains on (see latent_distribution); every row is drawn all the same."""
        items = [tuple(it) if len(it) == 4 else (0, *it) for it in items]  # (image, variant, prompt) -> stream 0
        mean, std = self.latent_distribution(items, kept)
        latents = sample_latents(mean, std, self.comps.vae.config, generator)
        noise = torch.randn(latents.shape, generator=generator)
        if timesteps is None:
            timesteps = torch.randint(self.num_train_timesteps, (len(items),), generator=generator)
        text, ids = self.text_for(items)
        weights = torch.tensor([self.streams[s].weight for s, *_ in items], dtype=torch.float32)
        num_instance = sum(1 for s, *_ in items if s < self.num_instance_streams)
        mask = None
        if any(self.streams[s].masked for s, *_ in items):
            size = latents.shape[-1]
            mask = torch.stack([self.streams[s].images.mask(i, v, size) if self.streams[s].masked
                                else torch.ones(1, size, size) for s, i, v, _ in items]).to(self.device)
        extra = self._sdxl_fields(items) if self.sdxl else {}
        return Batch(latents.to(self.device), noise.to(self.device), timesteps.to(self.device), text, ids,
                     weights.to(self.device), max(1, num_instance), mask, **extra)

    def _sdxl_fields(self, items) -> dict[str, torch.Tensor]:
        """SDXL's extra conditioning of the items: their time ids, and the pooled embeddings (cached text) or
        the second tokenizer's ids (text encoded every step)."""
        from .sdxl import time_ids

        size = self.bucket_of(items)
        out = {"time_ids": torch.stack([time_ids(self.source_of(s, size)[0], i, v) for s, i, v, _ in items])
               .to(self.device)}
        prompts = self.prompts_for(items)
        if self.text_cache is not None:
            out["pooled"] = torch.stack([self.text_cache.pooled[self.prompt_index[p]] for p in prompts]).to(self.device)
        else:
            out["input_ids_2"] = tokenize(self.comps.tokenizer_2, prompts).to(self.device)
        return out

    def draw(self, generator: torch.Generator, batch_size: int, rows=None) -> Batch:
        """rows(n): the slice of the n items drawn that the caller trains on (distributed.rows), or None: all."""
        items = self.draw_items(generator, batch_size)
        return self.make(items, generator, kept=rows(len(items)) if rows else None)


def bucket_pools(streams: list[Stream]) -> dict[Size, tuple[list[tuple[int, int]], torch.Tensor]] | None:
    """With buckets: for each bucket in use (sorted), its instance images [(stream, image)] and their draw
    weights (float64), each concept's mass 1/K shared equally among its n images, as _draw draws them. None
    without buckets."""
    if not any(st.images.bucketed for st in streams):
        return None
    pools: dict[Size, list[tuple[int, int, float]]] = {}
    for s, st in enumerate(streams):
        for i, size in enumerate(st.images.sizes):
            pools.setdefault(size, []).append((s, i, 1.0 / (len(streams) * len(st.images))))
    return {size: ([(s, i) for s, i, _ in pool], torch.tensor([w for *_, w in pool], dtype=torch.float64))
            for size, pool in sorted(pools.items())}
