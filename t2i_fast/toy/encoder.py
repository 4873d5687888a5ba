"""The evaluator's image encoder: our DINO analogue for the toy world.

A small CNN (32x32 RGB -> 128-d, global average pooled, so position barely matters) trained
self-supervised (SimCLR / InfoNCE) to map two renderings of the same object -- same shape, fill pattern
and colours, at another position, size and background -- close together and different objects apart.
Its training objects are broader than the diffusion model's world (random regular polygons, random
colours, stripes / checker / split / rings fills) the way DINO's data is broader than one concept, but
none of the example concepts' shapes (heart, ring, crescent, arrow, hourglass, tee) appear in it.

    embed(images) -> (N, 128) unit vectors;  subject fidelity = mean cosine similarity.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import world

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "encoder.safetensors"
CONFIG = HERE / "encoder.json"
ENCODER_CONFIG = dict(channels=(32, 64, 128), dim=128, image_size=world.IMAGE_SIZE)
PATTERNS = ("solid", "solid", "stripes", "checker", "split", "rings")


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator of one step of one pretraining stage (1-3: the model, 4: this encoder), reproducible alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Encoder(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> (N, dim) features (not normalized)."""

    def __init__(self, channels=(32, 64, 128), dim=128, image_size=32):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.GELU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))  # training only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------- training data
def _polygon(k: int, rot: float):
    def mask(u, v):
        inside = np.ones(u.shape, bool)
        for j in range(k):
            th = rot + 2 * math.pi * j / k
            inside &= u * math.cos(th) + v * math.sin(th) <= math.cos(math.pi / k)
        return inside
    return mask


def random_object(rng: np.random.Generator) -> dict:
    """An object identity: shape (world shape or regular polygon), fill pattern, colours, base radius."""
    if rng.random() < 0.5:
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
    else:
        shape = ("poly", int(rng.integers(3, 9)), float(rng.uniform(0, 2 * math.pi)))
    colors = tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
    return dict(shape=shape, pattern=PATTERNS[rng.integers(len(PATTERNS))], colors=colors,
                radius=float(rng.uniform(0.16, 0.38)))


def render_view(obj: dict, rng: np.random.Generator) -> np.ndarray:
    """The object at a random position and background, its size jittered by +-20%."""
    shape = obj["shape"] if isinstance(obj["shape"], str) else _polygon(obj["shape"][1], obj["shape"][2])
    radius = min(obj["radius"] * rng.uniform(0.8, 1.2), 0.42)
    lo, hi = radius + 0.02, 1 - radius - 0.02
    center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))) if hi > lo else (0.5, 0.5)
    if rng.random() < 0.6:
        bg = list(world.BACKGROUNDS.values())[rng.integers(len(world.BACKGROUNDS))]
    else:
        bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    colors = obj["colors"] if obj["pattern"] != "solid" else obj["colors"][0]
    return world.render(shape, colors, bg, center, radius, pattern=obj["pattern"], rng=rng)


def make_pool(n_objects: int, views: int, seed: int) -> np.ndarray:
    """(n_objects, views, 32, 32, 3) uint8."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_objects, views, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    for i in range(n_objects):
        obj = random_object(rng)
        for j in range(views):
            out[i, j] = render_view(obj, rng)
    return out


def train_encoder(work: Path, steps: int, seed: int, resume: bool, log, ckpt_every: int, run_loop,
                  batch: int = 64, n_objects: int = 3000, views: int = 4, temperature: float = 0.1) -> None:
    pool_path = work / "encoder_pool.npy"
    if resume and pool_path.exists():
        pool = np.load(pool_path)
    else:
        pool = make_pool(n_objects, views, seed + 17)
        np.save(pool_path, pool)
    pix = to_tensor(pool.reshape(-1, *pool.shape[2:])).view(n_objects, views, 3, *pool.shape[2:4])
    torch.manual_seed(seed + 3)
    model = Encoder(**ENCODER_CONFIG)

    def step_fn(step):
        g = step_generator(seed, 4, step)
        idx = torch.randperm(n_objects, generator=g)[:batch]
        v = torch.stack([torch.randperm(views, generator=g)[:2] for _ in range(batch)])
        x = torch.cat([pix[idx, v[:, 0]], pix[idx, v[:, 1]]])
        if torch.rand((), generator=g) < 0.5:  # mirror both views: the identity is mirror-invariant here
            x = x.flip(-1)
        z = nn.functional.normalize(model.head(model(x)), dim=-1)
        sim = z @ z.T / temperature
        sim.fill_diagonal_(-1e9)
        target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
        return nn.functional.cross_entropy(sim, target)

    run_loop("encoder", work, {"encoder": model}, list(model.parameters()), steps, 2e-3, 50, step_fn,
             ckpt_every, resume, log)


def export_encoder(work: Path, dest: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(work / "encoder.ckpt", weights_only=True)["modules"]["encoder"]
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}
    save_file(state, str(dest / WEIGHTS.name))
    (dest / CONFIG.name).write_text(json.dumps(ENCODER_CONFIG, indent=1) + "\n")


# --------------------------------------------------------------------------------------------- use
_CACHE: dict = {}


def load_encoder(path: str | Path = WEIGHTS) -> Encoder:
    """The shipped encoder (eval mode, CPU, fp32); cached per path."""
    from safetensors.torch import load_file

    path = Path(path)
    if path not in _CACHE:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python -m t2i_fast.toy.pretrain` to build it")
        cfg = json.loads((path.parent / CONFIG.name).read_text())
        model = Encoder(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise RuntimeError(f"{path}: weights do not match the encoder ({missing}, {unexpected})")
        _CACHE[path] = model.eval()
    return _CACHE[path]


@torch.no_grad()
def embed(images, model: Encoder | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 array or list of PIL images -> (N, dim) unit vectors (float32)."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2)) for im in images])
    model = model or load_encoder()
    return nn.functional.normalize(model(to_tensor(images)), dim=-1)
