"""The toy world: a procedural generator of small captioned images, deterministic from a seed.

One object per image: a shape (circle, square, triangle, diamond, cross) of a colour, a size and a
position, on a plain background.  Captions name some or all of the attributes ("a red triangle on a
white background", "a small blue circle at the top left"); attributes not named are drawn at random,
so the model learns what each word controls.  Images are IMAGE_SIZE x IMAGE_SIZE RGB uint8, rendered at
4x supersampling and box-filtered, so edges are anti-aliased.

The same renderer (``render``) draws the example concepts (concept_specs.py), whose shapes and patterns are not
in this world, and the evaluator reads colours and backgrounds back from pixels (``read_attributes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
MODEL_DIR = Path(__file__).resolve().parent / "model"  # the pretrained toy pipeline (pretrain.py made it)


def default_model_path() -> Path:
    """The bundled pretrained toy pipeline folder (load with StableDiffusionPipeline.from_pretrained)."""
    return MODEL_DIR


def is_bundled_model(model) -> bool:
    """Whether `model` (a path, or None) is the bundled toy pipeline folder."""
    return model is not None and Path(model).resolve() == MODEL_DIR.resolve()

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {  # object colours (RGB)
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.16, "medium": 0.25, "large": 0.36}  # radius as a fraction of the image side
POSITIONS = {  # centre as a fraction of the image side
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "center": (0.5, 0.5),
}
# every word a caption can contain; the tokenizer makes each of them one token
TEMPLATE_WORDS = ("a", "photo", "of", "on", "background", "at", "the", "in", "shape", "an", "image")
VOCABULARY = tuple(dict.fromkeys(
    TEMPLATE_WORDS + SHAPES + tuple(COLORS) + tuple(BACKGROUNDS) + tuple(SIZES)
    + tuple(w for p in POSITIONS for w in p.split())
))


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    position: str
    caption: str


# ---------------------------------------------------------------------------------------------- masks
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(c, c)  # x, y in [0, 1], y pointing down


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in its own coordinates (u, v) = (x - cx, y - cy) / radius, y down."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.82) & (av <= 0.82)
    if shape == "triangle":  # apex up
        return (v >= -0.95) & (v <= 0.8) & (au <= 0.62 * (v + 0.95))
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    # shapes that only the example concepts use
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.45 ** 2)
    if shape == "heart":
        w, h = u, v + 0.15
        lobe = ((w - 0.42) ** 2 + (h + 0.2) ** 2 <= 0.45 ** 2) | ((w + 0.42) ** 2 + (h + 0.2) ** 2 <= 0.45 ** 2)
        return lobe | ((h >= -0.2) & (h <= 0.95) & (np.abs(w) <= 0.87 * (0.95 - h) / 1.15))
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 >= 0.78 ** 2)
    if shape == "arrow":  # pointing right
        return ((u >= -0.95) & (u <= 0.1) & (av <= 0.28)) | ((u >= 0.1) & (u <= 0.95) & (av <= 0.85 * (0.95 - u)))
    if shape == "hourglass":
        return (av <= 0.9) & (au <= 0.85 * av + 0.05)
    if shape == "tee":  # the letter T
        return ((v >= -0.9) & (v <= -0.45) & (au <= 0.9)) | ((au <= 0.25) & (v >= -0.9) & (v <= 0.9))
    raise ValueError(f"unknown shape {shape!r}")


def pattern_colors(pattern: str, colors: tuple, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-pixel fill colour (…, 3) float32 for a fill pattern: solid, stripes, checker, split, rings."""
    c = [np.asarray(x, np.float32) for x in colors]
    if pattern == "solid":
        sel = np.zeros(u.shape, bool)
    elif pattern == "stripes":  # horizontal bands
        sel = (np.floor((v + 1.0) * 2.5) % 2).astype(bool)
    elif pattern == "checker":
        sel = ((np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)) % 2).astype(bool)
    elif pattern == "split":  # left half / right half
        sel = u > 0
    elif pattern == "rings":
        sel = (np.floor(np.sqrt(u * u + v * v) * 3.0) % 2).astype(bool)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    second = c[1] if len(c) > 1 else c[0]
    return np.where(sel[..., None], second, c[0])


def render(shape, color, background, center: tuple[float, float], radius: float,
           pattern: str = "solid", rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one object; returns (size, size, 3) uint8.

    shape: a name known to shape_mask, or a function (u, v) -> bool mask.
    color: one RGB triple, or a tuple of two for two-colour patterns.  center and radius are fractions of
    the image side.  rng, when given, adds a little colour jitter and pixel noise (the "photo" look).
    """
    n = size * SUPERSAMPLE
    x, y = _grid(n)
    u, v = (x - center[0]) / radius, (y - center[1]) / radius
    colors = (color,) if isinstance(color[0], (int, np.integer)) else tuple(color)
    if rng is not None:
        colors = tuple(np.clip(np.asarray(c, np.float32) + rng.normal(0, 6, 3), 0, 255) for c in colors)
        background = np.clip(np.asarray(background, np.float32) + rng.normal(0, 6, 3), 0, 255)
    mask = shape(u, v) if callable(shape) else shape_mask(shape, u, v)
    fill = pattern_colors(pattern, colors, u, v)
    img = np.where(mask[..., None], fill, np.asarray(background, np.float32))
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if rng is not None:
        img = img + rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- captions
def caption_for(shape: str, color: str, background: str, size: str, position: str,
                rng: np.random.Generator) -> str:
    """A caption naming the shape and a random subset of the other attributes."""
    words = []
    if rng.random() < 0.5:
        words.append(size)
    if rng.random() < 0.85:
        words.append(color)
    words.append("shape" if rng.random() < 0.08 else shape)
    text = " ".join(words)
    text = ("an " if text[0] in "aeiou" else "a ") + text
    if rng.random() < 0.15:
        text = rng.choice(["a photo of ", "an image of "]) + text
    parts = [text]
    if rng.random() < 0.4:
        parts.append("in the center" if position == "center" else f"at the {position}")
    if rng.random() < 0.6:
        parts.append(f"on a {background} background")
    if len(parts) == 3 and rng.random() < 0.5:
        parts[1], parts[2] = parts[2], parts[1]
    return " ".join(parts)


def sample_scene(rng: np.random.Generator) -> tuple[Scene, dict]:
    """Draw the attributes of one scene; returns it and the render arguments."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    radius = SIZES[size] * rng.uniform(0.9, 1.1)
    cx, cy = POSITIONS[position]
    # keep the object inside the frame; large objects sit nearer the centre
    lo, hi = radius + 0.02, 1 - radius - 0.02
    cx = float(np.clip(cx + rng.uniform(-0.05, 0.05), lo, hi))
    cy = float(np.clip(cy + rng.uniform(-0.05, 0.05), lo, hi))
    caption = caption_for(shape, color, background, size, position, rng)
    scene = Scene(shape, color, background, size, position, caption)
    return scene, dict(shape=shape, color=COLORS[color], background=BACKGROUNDS[background],
                       center=(cx, cy), radius=radius)


def generate(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n images (n, size, size, 3) uint8 and their scenes; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    for i in range(n):
        scene, args = sample_scene(rng)
        images[i] = render(rng=rng, size=size, **args)
        scenes.append(scene)
    return images, scenes


# ------------------------------------------------------------------------- reading attributes back
def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    d = ((np.asarray([table[k] for k in names], np.float32) - rgb) ** 2).sum(-1)
    return names[int(np.argmin(d))]


def read_background(img: np.ndarray) -> str:
    """The background colour name, from the median of the image border."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


def object_mask(img: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels that differ from the border's median colour by more than threshold (RGB distance)."""
    f = img.astype(np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    return np.sqrt(((f - np.median(border, axis=0)) ** 2).sum(-1)) > threshold


def read_color(img: np.ndarray) -> str | None:
    """The object colour name (majority vote of object pixels), or None when there is no object."""
    mask = object_mask(img)
    if mask.sum() < 4:
        return None
    pix = img[mask].astype(np.float32)
    table = np.asarray(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)
    names = list(COLORS) + list(BACKGROUNDS)
    votes = np.argmin(((pix[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    return names[int(np.bincount(votes, minlength=len(names)).argmax())]


def color_fraction(img: np.ndarray, color: str) -> float:
    """Fraction of object pixels whose nearest named colour is `color` (0 when there is no object)."""
    mask = object_mask(img)
    if mask.sum() < 4:
        return 0.0
    pix = img[mask].astype(np.float32)
    names = list(COLORS) + list(BACKGROUNDS)
    table = np.asarray(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)
    votes = np.argmin(((pix[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    return float((votes == names.index(color)).mean())


def _template_moments(shape: str) -> tuple[float, float, float]:
    """(area, centroid u, centroid v) of a shape in its own (u, v) units, from a fine rendering."""
    uu, vv = np.meshgrid(np.linspace(-1.2, 1.2, 241), np.linspace(-1.2, 1.2, 241))
    m = shape_mask(shape, uu, vv)
    return float(m.sum() * (2.4 / 240) ** 2), float(uu[m].mean()), float(vv[m].mean())


_MOMENTS = {s: _template_moments(s) for s in SHAPES}


def read_shape(img: np.ndarray) -> str | None:
    """The world shape whose template, placed by the object's centroid and scaled to its area, best
    overlaps the object mask (IoU).

    Area and centroid, unlike a bounding box, barely move when a blurry image (a VAE round trip, a
    generated sample) adds or drops a few edge pixels."""
    mask = object_mask(img)
    if mask.sum() < 4:
        return None
    n = img.shape[0]
    ys, xs = np.nonzero(mask)
    mx, my = (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n
    area = mask.sum() / (n * n)
    x, y = _grid(n)
    best, best_iou = None, -1.0
    for shape, (a, cu, cv) in _MOMENTS.items():
        r = np.sqrt(area / a)
        t = shape_mask(shape, (x - (mx - cu * r)) / r, (y - (my - cv * r)) / r)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read_position(img: np.ndarray) -> str | None:
    """The nearest named position to the object's centroid, or None when there is no object."""
    mask = object_mask(img)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    c = np.array([xs.mean(), ys.mean()]) / img.shape[0]
    return min(POSITIONS, key=lambda k: float(((np.asarray(POSITIONS[k]) - c) ** 2).sum()))


def read_attributes(img: np.ndarray) -> dict:
    """{'shape', 'color', 'background', 'position'} read from an (H, W, 3) uint8 image."""
    return dict(shape=read_shape(img), color=read_color(img), background=read_background(img),
                position=read_position(img))
