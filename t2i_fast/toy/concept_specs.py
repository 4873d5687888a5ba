"""Example concepts: novel objects that are not in the toy world, and the generator that made them.

Each concept is one object identity (a shape, fill pattern and colours the pretraining world never shows:
hearts, rings, crescents, arrows, the letter T, striped / checkered / split / bullseye fills, pink and teal)
drawn 5 times at varied positions, sizes and backgrounds.  Shipped as
``t2i_fast/toy/concepts/<name>/{0..4}.png`` + ``concept.json`` ({class_word, token, ...}).

    python -m t2i_fast.toy.concept_specs [--dest DIR]   # regenerate (deterministic)
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world

HERE = Path(__file__).resolve().parent
CONCEPTS_DIR = HERE / "concepts"
N_IMAGES = 5
SEED = 1234

PINK, TEAL = (250, 110, 180), (0, 160, 160)
W = world.COLORS
SPECS: dict[str, dict] = {
    # name: shape, pattern, colours, class word (a world word), suggested token
    "bee_ball": dict(shape="circle", pattern="stripes", colors=(W["yellow"], (25, 25, 25)), class_word="circle",
                     token="<bee>"),
    "checker_square": dict(shape="square", pattern="checker", colors=(W["red"], W["blue"]), class_word="square",
                           token="<chk>"),
    "teal_ring": dict(shape="ring", pattern="solid", colors=(TEAL,), class_word="circle", token="<ring>"),
    "pink_heart": dict(shape="heart", pattern="solid", colors=(PINK,), class_word="shape", token="<heart>"),
    "moon": dict(shape="crescent", pattern="solid", colors=(W["yellow"],), class_word="shape", token="<moon>"),
    "split_diamond": dict(shape="diamond", pattern="split", colors=(W["green"], W["purple"]), class_word="diamond",
                          token="<split>"),
    "orange_arrow": dict(shape="arrow", pattern="solid", colors=(W["orange"],), class_word="shape", token="<arrow>"),
    "target": dict(shape="circle", pattern="rings", colors=(W["red"], (245, 245, 245)), class_word="circle",
                   token="<target>"),
    "blue_tee": dict(shape="tee", pattern="solid", colors=(W["blue"],), class_word="shape", token="<tee>"),
}


@dataclass(frozen=True)
class Concept:
    name: str
    images_dir: Path
    class_word: str
    token: str


def render_concept(name: str, n: int = N_IMAGES, seed: int = SEED) -> list[np.ndarray]:
    """n (32, 32, 3) uint8 views of a concept: backgrounds cycle white/black/gray, positions and sizes vary."""
    spec = SPECS[name]
    rng = np.random.default_rng([seed, list(SPECS).index(name)])
    bgs = list(world.BACKGROUNDS.values())
    out = []
    for i in range(n):
        radius = float(rng.uniform(0.24, 0.36))
        lo, hi = radius + 0.02, 1 - radius - 0.02
        center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        colors = spec["colors"] if len(spec["colors"]) > 1 else spec["colors"][0]
        bg = bgs[(i + list(SPECS).index(name)) % len(bgs)]
        out.append(world.render(spec["shape"], colors, bg, center, radius, pattern=spec["pattern"], rng=rng))
    return out


def write_concepts(dest: Path = CONCEPTS_DIR, n: int = N_IMAGES, seed: int = SEED) -> Path:
    from PIL import Image

    for name, spec in SPECS.items():
        d = Path(dest) / name
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(render_concept(name, n, seed)):
            Image.fromarray(img).save(d / f"{i}.png")
        meta = dict(name=name, class_word=spec["class_word"], token=spec["token"], shape=spec["shape"],
                    pattern=spec["pattern"], colors=[list(c) for c in spec["colors"]], n_images=n, seed=seed,
                    generator="t2i_fast.toy.concept_specs.render_concept")
        (d / "concept.json").write_text(json.dumps(meta, indent=1) + "\n")
    return Path(dest)


# the one `t2i-fast train` uses by default (concepts()[0]): the evaluator separates a quick LoRA on it from
# the base model most clearly (VALIDATION.md), while bee_ball is the hardest (the base already draws yellow balls)
DEFAULT = "teal_ring"


def concepts() -> list[str]:
    """Names of the bundled example concepts, the default one first."""
    return [DEFAULT] + [n for n in SPECS if n != DEFAULT]


def concept(name: str) -> Concept:
    """A bundled concept: its image folder, class word and suggested token."""
    if name not in SPECS:
        raise KeyError(f"unknown toy concept {name!r}; choose one of {', '.join(SPECS)}")
    d = CONCEPTS_DIR / name
    if not (d / "concept.json").exists():
        raise FileNotFoundError(f"{d}/concept.json is missing: run `python -m t2i_fast.toy.concept_specs`")
    meta = json.loads((d / "concept.json").read_text())
    return Concept(name=name, images_dir=d, class_word=meta["class_word"], token=meta["token"])


def load_images(name_or_dir) -> np.ndarray:
    """(n, H, W, 3) uint8 reference images of a concept (name or folder), sorted by file name."""
    from PIL import Image

    d = Path(name_or_dir) if Path(str(name_or_dir)).is_dir() else concept(str(name_or_dir)).images_dir
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    size = (world.IMAGE_SIZE, world.IMAGE_SIZE)
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize(size)) for p in files])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_fast.toy.concept_specs", description="write the example concepts")
    p.add_argument("--dest", default=str(CONCEPTS_DIR))
    a = p.parse_args(argv)
    print(write_concepts(Path(a.dest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
