"""What `t2i-fast train` uses when no --model or --images is given: the bundled toy model and one of its
example concepts, or, where the package ships no toy model, the tiny random model built locally."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("T2I_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "t2i_fast")
    return Path(root)


def _toy():
    try:
        from . import toy
    except ImportError:
        return None
    path = getattr(toy, "default_model_path", None)
    return toy if path is not None and (Path(path()) / "model_index.json").is_file() else None


def default_model() -> str:
    toy = _toy()
    if toy is not None:
        return str(toy.default_model_path())
    path = cache_dir() / "tiny-model"
    if not (path / "model_index.json").is_file():
        from .testing import save_pipeline

        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_pipeline("tiny", tmp)
        tmp.rename(path) if not path.exists() else None
    return str(path)


def is_default_model(model) -> bool:
    toy = _toy()
    return toy is not None and model is not None and Path(model).resolve() == Path(toy.default_model_path()).resolve()


def default_concept() -> dict:
    """{"images": dir, "class_word": ..., "token": ...} of the bundled example concept."""
    toy = _toy()
    if toy is not None:
        name = toy.concepts()[0]
        c = toy.concept(name)
        return {"images": str(c.images_dir), "class_word": c.class_word, "token": c.token}
    path = cache_dir() / "tiny-concept"
    if not path.is_dir():
        from .testing import write_concept_images

        write_concept_images(path, n=4, size=64)
    return {"images": str(path), "class_word": "square", "token": "<sks>"}
