"""Aspect-ratio buckets (--buckets): train on images of different shapes without cropping them to squares.

Each image is assigned once to a bucket, a (width, height) in pixels, and is resized to cover that bucket and
cropped to it; a batch holds items of one bucket only, so its latents stack (batches.py draws the bucket
first). The bucket list is kohya sd-scripts' (make_bucket_resolutions): the square of the resolution, and for
every width from resolution/2 to 2 * resolution in steps, the tallest height that keeps the area within
resolution^2, both ways round. An image goes to the bucket whose aspect is nearest its own on a log scale
(so 2:1 and 1:2 are equally far from 1:1), the larger bucket on a tie.

Sides are multiples of 64: the SD VAE downsamples by 8 and the SD 1.x UNet by 8 more (SDXL's by 4), so a
side of 64k pixels gives a latent grid every down block halves exactly. Below 256 px (the tiny test models,
whose VAE and UNet downsample by 2 each) 64 would leave only one or two buckets, so the step is 8 there.
"""
from __future__ import annotations

import math

from .errors import UserError

SMALL = 256  # below this resolution the bucket step is 8 px instead of 64 (module docstring)


def bucket_step(resolution: int) -> int:
    return 64 if resolution >= SMALL else 8


def check_resolution(resolution: int) -> None:
    """A UserError unless the square bucket is the resolution itself (resolution a multiple of the step)."""
    step = bucket_step(resolution)
    if resolution % step:
        raise UserError(f"--buckets needs a --resolution that is a multiple of {step} (bucket sides are); got "
                        f"{resolution}, use e.g. {max(step, round(resolution / step) * step)}")


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Every bucket (width, height), sorted from the tallest to the widest: multiples of the step, area at
    most resolution^2, each side within [resolution / 2, 2 * resolution]."""
    step = bucket_step(resolution)
    lo, hi, area = max(step, resolution // 2 // step * step), 2 * resolution // step * step, resolution ** 2
    side = resolution // step * step
    sizes = {(side, side)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect is nearest the image's; on a tie the larger area, then the first listed."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def cover_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(w, h) in source pixels of the largest box of the bucket's aspect inside the image: the region that,
    resized to the bucket, covers it (the image resized to cover the bucket, then cropped to it)."""
    bw, bh = bucket
    if width * bh >= height * bw:  # the image is wider than the bucket: full height, crop the width
        return min(width, max(1, round(height * bw / bh))), height
    return width, min(height, max(1, round(width * bh / bw)))


def crop_boxes(width: int, height: int, bucket: tuple[int, int], center: bool, count: int,
               rng) -> list[tuple[int, int, int, int]]:
    """(left, top, w, h) crop boxes in source pixels of one image for its bucket: the centred cover box, or
    `count` random ones 80-100% of its size at random places (as the square crops of data.ConceptImages),
    drawn from `rng` (a numpy Generator; unused for the centred box)."""
    cw, ch = cover_box(width, height, bucket)
    if center:
        return [((width - cw) // 2, (height - ch) // 2, cw, ch)]
    boxes = []
    for _ in range(max(1, count)):
        f = float(rng.uniform(0.8, 1.0))
        w, h = max(1, round(cw * f)), max(1, round(ch * f))
        boxes.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    return boxes
