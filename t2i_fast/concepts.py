"""Concepts and their class (prior-preservation) images: from the config or a concepts file, into the
streams a batch is drawn from. Class images come as folders (captions in NAME.txt beside each image); those
generated from a class prompt are made by class_images.py, which sits above sampling.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .batches import Stream
from .config import check_token, check_types, field_kinds
from .data import ConceptImages, format_prompt, list_images
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


def build_streams(cfg, method, concepts: list[Concept], class_folders: list[Path | None],
                  resolution: int) -> tuple[list[Stream], Stream | None]:
    """Instance streams (one per concept) and the class stream (all concepts' class images, class_folders[i]
    being concept i's or None), if any."""
    rescale = cfg.crop_variants if getattr(method, "rescale_augment", False) else 0
    streams, class_parts = [], []
    for n, c in enumerate(concepts):
        images = ConceptImages(c.images, resolution, cfg.center_crop, cfg.random_flip, cfg.crop_variants,
                               cfg.seed + n, rescale_variants=rescale, first=getattr(method, "images_used", None),
                               buckets=cfg.buckets)
        prompts = [method.prompt(format_prompt(t, c.token, c.class_word))
                   for t in method.prompt_templates(cfg)]
        streams.append(Stream(images, prompts, masked=rescale > 0, prefix=rescale > 0))
        folder = class_folders[n]
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
