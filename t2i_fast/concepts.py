"""Concepts and their class (prior-preservation) images: from the config or a concepts file, into the
streams a batch is drawn from. Class images can be a folder (captions in NAME.txt beside each image) or
generated once by the base model from a class prompt and cached on disk, keyed by model, prompt and size.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .batches import Stream
from .config import check_token, check_types, field_kinds
from .data import ConceptImages, format_prompt, list_images, templates_for
from .errors import UserError


@dataclass
class Concept:
    images: str
    token: str
    class_word: str = ""
    class_images: str | None = None
    class_prompt: str | None = None


def load_concepts(cfg) -> list[Concept]:
    """The run's concepts: the entries of cfg.concepts (a JSON file), or the one concept of the flags."""
    if not cfg.concepts:
        return [Concept(cfg.images, cfg.token, cfg.class_word, cfg.class_images, cfg.class_prompt)]
    path = Path(cfg.concepts).expanduser()
    if not path.is_file():
        raise UserError(f"concepts file {path} does not exist; pass a JSON list of "
                        f"{{images, token, class_word, class_images | class_prompt}}")
    try:
        entries = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"concepts file {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"concepts file {path} must hold a non-empty JSON list of objects")
    allowed = {"images", "token", "class_word", "class_images", "class_prompt"}
    concepts = []
    for n, entry in enumerate(entries, 1):
        unknown = sorted(set(entry) - allowed)
        if unknown or "images" not in entry:
            raise UserError(f"concepts file {path}, entry {n}: " + (f"unknown key(s) {', '.join(unknown)}" if unknown
                            else "missing 'images'") + f"; allowed keys are {', '.join(sorted(allowed))}")
        where = f"concepts file {path}, entry {n}"
        check_types(entry, field_kinds(Concept), where)
        check_token(entry.get("token", "<new>"), f"{where}: token")
        base = path.parent
        resolve = lambda p: p and str(base / os.path.expanduser(p))  # noqa: E731  (~ first; absolute paths stay)
        list_images(resolve(entry["images"]))  # fail now, naming the folder
        concepts.append(Concept(resolve(entry["images"]), entry.get("token", f"<new{n}>"),
                                entry.get("class_word", ""), resolve(entry.get("class_images")),
                                entry.get("class_prompt")))
    tokens = [c.token for c in concepts]
    if len(set(tokens)) != len(tokens):
        raise UserError(f"concepts file {path}: tokens must differ, got {tokens}")
    return concepts


def read_captions(folder: Path, files: list[Path], default: str) -> list[str]:
    """NAME.txt beside NAME.png holds the caption of that image; otherwise `default`."""
    out = []
    for f in files:
        txt = f.with_suffix(".txt")
        out.append(txt.read_text().strip() if txt.is_file() else default)
    return out


def class_image_folder(concept: Concept, cfg, model: str, resolution: int, seed: int) -> Path | None:
    """The folder of class images: the user's, or generated from the class prompt and cached."""
    if concept.class_images:
        list_images(concept.class_images)
        return Path(concept.class_images)
    if not concept.class_prompt:
        return None
    from .defaults import cache_dir

    key = hashlib.sha256(json.dumps([str(Path(model).resolve()), concept.class_prompt, resolution,
                                     cfg.num_class_images, seed]).encode()).hexdigest()[:16]
    folder = cache_dir() / "class_images" / key
    if (folder / "done").is_file():
        return folder
    generate_class_images(model, concept.class_prompt, cfg.num_class_images, resolution, folder, seed,
                          device=cfg.device, progress=cfg.progress)
    return folder


def generate_class_images(model, prompt: str, n: int, resolution: int, folder: Path, seed: int,
                          device: str = "auto", progress: bool = True) -> None:
    """Generate n images of `prompt` with the base model into `folder` (with captions), atomically."""
    import shutil

    import torch
    from tqdm.auto import tqdm

    from .sampling import build_pipeline, generate

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    pipe = build_pipeline(model, device=dev, progress=False)
    for i in tqdm(range(n), desc="generating class images", disable=not progress, leave=False):
        (img,) = generate(pipe, prompt, n=1, seed=seed + i, steps=25, resolution=resolution)
        img.save(tmp / f"class_{i:04d}.png")
        (tmp / f"class_{i:04d}.txt").write_text(prompt)
    (tmp / "done").write_text(prompt)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def build_streams(cfg, method, model: str, resolution: int) -> tuple[list[Stream], Stream | None]:
    """Instance streams (one per concept) and the class stream (all concepts' class images), if any."""
    concepts = load_concepts(cfg)
    rescale = cfg.crop_variants if getattr(method, "rescale_augment", False) else 0
    streams, class_parts = [], []
    for n, c in enumerate(concepts):
        images = ConceptImages(c.images, resolution, cfg.center_crop, cfg.random_flip, cfg.crop_variants,
                               cfg.seed + n, rescale_variants=rescale)
        prompts = [method.prompt(format_prompt(t, c.token, c.class_word))
                   for t in templates_for(cfg.method, cfg.template)]
        streams.append(Stream(images, prompts, masked=rescale > 0, prefix=rescale > 0))
        folder = class_image_folder(c, cfg, model, resolution, cfg.seed) if method.uses_prior else None
        if folder is not None:
            default_caption = c.class_prompt or format_prompt("a photo of a {cls}", "", c.class_word)
            class_parts.append((folder, default_caption))
    prior = None
    if class_parts:
        # one class stream over every concept's class images (a merged folder view)
        images = ConceptImages.from_folders([f for f, _ in class_parts], resolution, cfg.random_flip)
        captions = []
        for folder, default in class_parts:
            captions += read_captions(folder, list_images(folder), default)
        prior = Stream(images, [captions[0]], weight=cfg.prior_loss_weight, captions=captions)
    return streams, prior
