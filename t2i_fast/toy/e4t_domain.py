"""The toy domain of E4T's pre-training: many object identities of the toy world's generator, none of them a
held-out concept.

An identity is a shape (the world's five and the example concepts' six), a fill pattern and one or two random
colours; each is drawn N times at varied positions, sizes and backgrounds, as the example concepts are
(concept_specs.render_concept). Identities too close to an example concept (same shape and pattern, colours
within COLOR_MARGIN) are drawn again, so the bundled concepts stay held out; so do identities drawn with any
other seed (`held_out`).

    python -m t2i_fast.toy.e4t_domain --out DIR [--concepts 400] [--images 4] [--seed 7]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import world
from .concept_specs import SPECS

SHAPES = world.SHAPES + ("ring", "heart", "crescent", "arrow", "hourglass", "tee")
PATTERNS = ("solid", "stripes", "checker", "split", "rings")
COLOR_MARGIN = 80.0  # RGB distance under which a colour counts as an example concept's
PRETRAIN_SEED = 7
SHIPPED = Path(__file__).resolve().parent / "e4t"  # the domain pre-trained for the bundled model (README)


def _too_close(shape: str, pattern: str, colors: list[tuple]) -> bool:
    for spec in SPECS.values():
        if spec["shape"] == shape and spec["pattern"] == pattern:
            theirs = [np.asarray(c, float) for c in spec["colors"]]
            if all(min(np.linalg.norm(np.asarray(c, float) - t) for t in theirs) < COLOR_MARGIN for c in colors):
                return True
    return False


def identities(n: int, seed: int = PRETRAIN_SEED) -> list[dict]:
    """n identities {shape, pattern, colors}, none close to an example concept."""
    rng = np.random.default_rng([seed, 4321])
    out = []
    while len(out) < n:
        shape, pattern = str(rng.choice(SHAPES)), str(rng.choice(PATTERNS))
        count = 1 if pattern == "solid" else 2
        colors = [tuple(int(x) for x in rng.integers(20, 236, 3)) for _ in range(count)]
        if not _too_close(shape, pattern, colors):
            out.append({"shape": shape, "pattern": pattern, "colors": colors})
    return out


def render_identity(identity: dict, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n (32, 32, 3) uint8 views: positions, sizes and backgrounds vary, as in concept_specs.render_concept."""
    bgs = list(world.BACKGROUNDS.values())
    colors = identity["colors"] if len(identity["colors"]) > 1 else identity["colors"][0]
    views = []
    for i in range(n):
        radius = float(rng.uniform(0.24, 0.36))
        lo, hi = radius + 0.02, 1 - radius - 0.02
        center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        bg = bgs[int(rng.integers(len(bgs)))]
        views.append(world.render(identity["shape"], colors, bg, center, radius, pattern=identity["pattern"], rng=rng))
    return views


def write_domain(dest: Path, n_concepts: int = 400, n_images: int = 4, seed: int = PRETRAIN_SEED) -> Path:
    """DEST/<k>/{0..n_images-1}.png + identity.json for each of n_concepts identities."""
    from PIL import Image

    dest = Path(dest)
    rng = np.random.default_rng([seed, 99])
    for k, identity in enumerate(identities(n_concepts, seed)):
        d = dest / f"{k:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(render_identity(identity, n_images, rng)):
            Image.fromarray(img).save(d / f"{i}.png")
        (d / "identity.json").write_text(json.dumps(identity) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_fast.toy.e4t_domain",
                                description="write the toy domain for `t2i-fast pretrain-e4t`")
    p.add_argument("--out", required=True)
    p.add_argument("--concepts", type=int, default=400)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED, help="another seed draws held-out identities")
    a = p.parse_args(argv)
    print(write_domain(Path(a.out), a.concepts, a.images, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
