"""The embedded toy world: a tiny pretrained text-to-image model, example concepts and an evaluator.

    default_model_path()   the bundled StableDiffusionPipeline folder (32x32 images, 8x8x4 latents)
    is_bundled_model(p)    whether p is that folder
    concepts()             names of the bundled example concepts
    concept(name)          Concept(name, images_dir, class_word, token)
    evaluate(...)          subject fidelity, prompt fidelity, preservation (see evaluate.py)

Modules: world.py (the generator), concepts.py, pretrain.py (``python -m t2i_fast.toy.pretrain``),
encoder.py (the evaluator's image encoder), evaluate.py (``t2i-fast eval RUN``), validate.py.
Importing this package imports neither torch nor diffusers (world.py: numpy only).
"""
from __future__ import annotations

__all__ = ["default_model_path", "is_bundled_model", "concepts", "concept", "evaluate", "Concept", "IMAGE_SIZE"]

from .world import IMAGE_SIZE, default_model_path, is_bundled_model


def concepts() -> list[str]:
    from .concepts import concepts as _c

    return _c()


def concept(name: str):
    from .concepts import concept as _c

    return _c(name)


def evaluate(pipeline_or_model_dir=None, token: str = "<sks>", class_word: str = "shape", concept_name=None,
             adapter_dir=None, **kw) -> dict:
    from .evaluate import evaluate as _e

    return _e(pipeline_or_model_dir, token, class_word, concept_name, adapter_dir=adapter_dir, **kw)


def __getattr__(name: str):
    if name == "Concept":
        from .concepts import Concept

        return Concept
    raise AttributeError(f"module 't2i_fast.toy' has no attribute {name!r}")
