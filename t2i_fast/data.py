"""Concept images, prompt templates, augmentation, and exact caches of VAE latents and text features.

Augmentation is a fixed, finite set of variants per image (crop box x flip), so the VAE latent
distribution (mean, std) of every variant can be computed once before training. A training step then
samples latents = (mean + std * eps) * scaling_factor from that cache, with eps drawn from the training
generator: exactly what encoding the same pixels every step would give, for a fraction of the cost. The
uncached path encodes the pixels every step and samples the same way, so both paths agree.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .buckets import bucket_sizes, crop_boxes, nearest_bucket
from .buckets import check_resolution as check_bucket_resolution
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# The textual-inversion prompt list for objects, as in the original paper's code.
OBJECT_TEMPLATES = [
    "a photo of a {token}", "a rendering of a {token}", "a cropped photo of the {token}",
    "the photo of a {token}", "a photo of a clean {token}", "a photo of a dirty {token}",
    "a dark photo of the {token}", "a photo of my {token}", "a photo of the cool {token}",
    "a close-up photo of a {token}", "a bright photo of the {token}", "a cropped photo of a {token}",
    "a photo of the {token}", "a good photo of the {token}", "a photo of one {token}",
    "a close-up photo of the {token}", "a rendition of the {token}", "a photo of the clean {token}",
    "a rendition of a {token}", "a photo of a nice {token}", "a good photo of a {token}",
    "a photo of the nice {token}", "a photo of the small {token}", "a photo of the weird {token}",
    "a photo of the large {token}", "a photo of a cool {token}", "a photo of a small {token}",
]
INSTANCE_TEMPLATE = "a photo of {token} {cls}"


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a concept folder, sorted; a UserError if there is none."""
    if folder is None:
        raise UserError("no image folder given; pass --images DIR with 3-20 images of the concept")
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise UserError(f"image folder {folder} is a file, not a folder; pass --images {folder.parent} (the folder "
                        f"that holds it) or a folder of the concept's images")
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass --images DIR with images of the concept")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add 3-20 images")
    return files


def load_image(path: Path):
    """Open an image as RGB with its EXIF orientation applied (RGBA/LA/P/L/CMYK converted)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" from older Pillow): PIL's RGB
                # conversion clips these to 255 instead of scaling them, which would leave a white image
                img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, img)  # transparent pixels become white, not black
            return img.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's guard against a tiny file that decodes to gigabytes
        raise UserError(f"image {path} is larger than Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels (a "
                        f"possible decompression bomb); downscale or remove the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from None


def warn_if_small(files: list[Path], images: list, resolution: int) -> None:
    """One warning for the images whose shorter side is below the resolution: they are upscaled (blurred)."""
    small = [(f, img.size) for f, img in zip(files, images) if min(img.size) < resolution]
    if small:
        name, (w, h) = small[0][0], small[0][1]
        warnings.warn(f"{len(small)} of {len(files)} images in {name.parent} are smaller than the training "
                      f"resolution of {resolution} px (e.g. {name.name}, {w}x{h}); they are upscaled, which blurs "
                      f"them: use larger images or a lower --resolution", stacklevel=3)


def format_prompt(template: str, token: str, class_word: str) -> str:
    return " ".join(template.replace("{token}", token).replace("{cls}", class_word).split())


@dataclass(frozen=True)
class Variant:
    """One augmentation of an image: a square crop box (left, top, size) in source pixels, a flip, and a
    rescale (Custom Diffusion's augmentation): scale < 1 shrinks the crop and pastes it at (px, py) on a
    blank canvas, scale > 1 zooms in on the region at (px, py). px, py in [0, 1]. With aspect-ratio buckets
    the box is `size` wide and `height` high (None: square)."""

    left: int
    top: int
    size: int
    flip: bool
    scale: float = 1.0
    px: float = 0.5
    py: float = 0.5
    wording: int = 0  # which of the two prompt prefixes of a rescale (drawn with the flip, independent of it)
    height: int | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in source pixels, as PIL's crop takes it."""
        height = self.size if self.height is None else self.height
        return self.left, self.top, self.left + self.size, self.top + height

    @property
    def prefix(self) -> str:
        """The prompt prefix that tells the model about the rescale, as the Custom Diffusion paper does."""
        if self.scale < 0.6:
            return "a far away " if self.wording else "very small "
        if self.scale > 1.0:
            return "zoomed in " if self.wording else "close up "
        return ""


RESCALE_RANGE = (1 / 3, 1.4)  # the extremes of Custom Diffusion's rescale, as a fraction of the resolution


def draw_rescale(rng: np.random.Generator) -> float:
    """Custom Diffusion's rescale (train_custom_diffusion.py): 2/3 of the time shrink to [1/3, 1] of the
    resolution, otherwise zoom to [1.2, 1.4]; so every zoom gets a "zoomed in"/"close up" prefix."""
    return float(rng.uniform(1 / 3, 1.0)) if rng.uniform() < 0.66 else float(rng.uniform(1.2, 1.4))


class ConceptImages:
    """The concept's images at one resolution with a fixed, finite set of augmentation variants each.

    sizes[i]: the (width, height) in pixels image i is trained at: (resolution, resolution), or with
    buckets its aspect-ratio bucket (buckets.py), which its crop boxes then have the aspect of."""

    def __init__(self, folder, resolution: int, center_crop: bool = True, random_flip: bool = True,
                 crop_variants: int = 4, seed: int = 0, rescale_variants: int = 0, first: int | None = None,
                 buckets: bool = False):
        """first: use only the first `first` images of the folder (in file-name order); None: all."""
        if resolution % 8:
            raise UserError(f"--resolution {resolution} is not a multiple of 8; use e.g. {resolution // 8 * 8 or 8}")
        if buckets:
            check_bucket_resolution(resolution)
            if rescale_variants:
                raise UserError("--buckets cannot be used with custom_diffusion's rescale augmentation (its canvases "
                                "and loss masks are square); drop --buckets")
        self.files = list_images(folder)[:first]
        self.images = [load_image(p) for p in self.files]
        self.resolution = resolution
        self.center_crop = center_crop  # SDXL's crop conditioning is computed differently for it (sdxl.py)
        self.bucketed = buckets
        square = [(resolution, resolution)] * len(self.images)
        self.sizes = [nearest_bucket(*img.size, bucket_sizes(resolution)) for img in self.images] if buckets else square
        warn_if_small(self.files, self.images, resolution)
        rng = np.random.default_rng(seed)  # crop boxes and rescales are part of the data, drawn once
        flips = (False, True) if random_flip else (False,)
        self.variants: list[list[Variant]] = []
        for img, size in zip(self.images, self.sizes):
            w, h = img.size
            side = min(w, h)
            if buckets:  # rescales are refused above, so boxes x flips is all there is
                boxes = crop_boxes(w, h, size, center_crop, crop_variants, rng)
                self.variants.append([Variant(l, t, bw, f, height=bh) for (l, t, bw, bh) in boxes for f in flips])
                continue
            if center_crop:
                boxes = [((w - side) // 2, (h - side) // 2, side)]
            else:
                boxes = []
                for _ in range(max(1, crop_variants)):
                    s = int(rng.integers(int(side * 0.8), side + 1))
                    boxes.append((int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1)), s))
            variants = [Variant(l, t, s, f) for (l, t, s) in boxes for f in flips]
            for _ in range(rescale_variants):
                l, t, s = boxes[int(rng.integers(len(boxes)))]
                scale = draw_rescale(rng)
                coin = int(rng.integers(2))  # the prefix's wording, and the flip where flips are allowed
                variants.append(Variant(l, t, s, bool(coin) and random_flip, scale, float(rng.uniform()),
                                        float(rng.uniform()), wording=coin))
            self.variants.append(variants)

    @classmethod
    def from_folders(cls, folders, resolution: int, random_flip: bool = True) -> "ConceptImages":
        """Center-cropped images of several folders as one set (class images of several concepts)."""
        first, *rest = [cls(f, resolution, True, random_flip) for f in folders]
        for other in rest:
            first.files += other.files
            first.images += other.images
            first.variants += other.variants
            first.sizes += other.sizes
        return first

    def cropped_to(self, size: tuple[int, int]) -> "ConceptImages":
        """The same center-cropped images, every one cropped to cover `size` (width, height) instead: the
        class images of a batch whose instance images share that bucket. Shares the decoded images."""
        if not self.center_crop:
            raise ValueError("cropped_to keeps center crops only (class images are center-cropped)")
        view = copy.copy(self)
        view.bucketed, view.sizes = True, [tuple(size)] * len(self)
        flips = sorted({v.flip for v in self.variants[0]})
        view.variants = []
        for img in self.images:
            (l, t, bw, bh), = crop_boxes(*img.size, size, True, 1, None)
            view.variants.append([Variant(l, t, bw, f, height=bh) for f in flips])
        return view

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_variants(self) -> int:
        return len(self.variants[0])

    def variant(self, index: int, variant: int) -> Variant:
        return self.variants[index][variant]

    def pixels(self, index: int, variant: int) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1] for image `index` under augmentation `variant`; (W, H) = sizes[index],
        (R, R) without buckets."""
        from PIL import Image

        v = self.variants[index][variant]
        r = self.resolution
        img = self.images[index].crop(v.box)
        if v.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if v.scale < 1.0:  # shrink, paste on a blank (mid-grey, i.e. zero) canvas
            inner = max(8, int(round(r * v.scale)))
            canvas = Image.new("RGB", (r, r), (127, 127, 127))
            x0, y0 = self._offset(v, r - inner)
            canvas.paste(img.resize((inner, inner), Image.Resampling.BICUBIC), (x0, y0))
            img = canvas
        elif v.scale > 1.0:  # zoom in: resize up, crop an r x r window
            outer = int(round(r * v.scale))
            x0, y0 = self._offset(v, outer - r)
            img = img.resize((outer, outer), Image.Resampling.BICUBIC).crop((x0, y0, x0 + r, y0 + r))
        else:
            img = img.resize(self.sizes[index], Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return arr / 127.5 - 1.0

    @staticmethod
    def _offset(v: Variant, room: int) -> tuple[int, int]:
        return int(round(v.px * room)), int(round(v.py * room))

    def mask(self, index: int, variant: int, latent_size: int) -> torch.Tensor:
        """(1, h, w) float32: 1 where the latent covers image content, 0 on the blank canvas of a shrink."""
        v = self.variants[index][variant]
        m = torch.ones(1, latent_size, latent_size)
        if v.scale < 1.0:
            f = self.resolution / latent_size
            inner = max(8, int(round(self.resolution * v.scale)))
            x0, y0 = self._offset(v, self.resolution - inner)
            m.zero_()
            # latent cells fully inside the pasted region keep their loss
            m[:, int(np.ceil(y0 / f)):int((y0 + inner) // f), int(np.ceil(x0 / f)):int((x0 + inner) // f)] = 1
        return m


@torch.no_grad()
def encode_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent distribution of (B, 3, R, R) pixels: (mean, std), each (B, C, R/f, R/f), unscaled."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, vae_config, generator: torch.Generator) -> torch.Tensor:
    """latents = (mean + std * eps - shift) * scaling_factor, eps from `generator` (on the CPU, so the stream
    is the same on every device)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae_config.scaling_factor


class LatentCache:
    """(mean, std) of every image x variant, computed once. Index with (image, variant). mean[i], std[i]:
    (V, C, h, w) of image i, a list since bucketed images differ in (h, w)."""

    def __init__(self, images: ConceptImages, vae, progress: bool = False):
        from tqdm.auto import tqdm

        from . import distributed as dist

        pairs = [(i, v) for i in range(len(images)) for v in range(images.num_variants)]
        # under torchrun / accelerate each process encodes every W-th pair and they exchange the results
        shared = dist.world() > 1 and dist.shares_cache_work()
        mine = range(dist.rank(), len(pairs), dist.world()) if shared else range(len(pairs))
        encoded = {}
        # one image per encode: the same batch shape as the uncached path, so the numbers match exactly
        for k in tqdm(mine, desc="caching latents", disable=not progress or not dist.is_main(), leave=False):
            m, s = encode_distribution(vae, images.pixels(*pairs[k])[None])
            encoded[k] = (m[0].cpu(), s[0].cpu())
        if shared:
            encoded = {k: pair for part in dist.gather(encoded) for k, pair in part.items()}
        means = [encoded[k][0] for k in range(len(pairs))]
        stds = [encoded[k][1] for k in range(len(pairs))]
        n = images.num_variants
        self.mean = [torch.stack(means[i:i + n]) for i in range(0, len(means), n)]
        self.std = [torch.stack(stds[i:i + n]) for i in range(0, len(stds), n)]

    def get(self, index: int, variant: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean[index][variant], self.std[index][variant]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, model_max_length) input ids, padded and truncated like the SD pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids.to(text_encoder.device))[0].float()


class TextCache:
    """Text-encoder outputs of every prompt, for a frozen text encoder. (P, L, D) on the CPU."""

    def __init__(self, prompts: list[str], tokenizer, text_encoder):
        self.prompts = list(prompts)
        ids = tokenize(tokenizer, self.prompts)
        # one prompt per call, matching the uncached path's batch-of-one numerics
        self.features = torch.cat([encode_text(text_encoder, ids[i:i + 1]).cpu() for i in range(len(ids))])

    def get(self, index: int) -> torch.Tensor:
        return self.features[index]
