"""The embedded toy world: a tiny pretrained text-to-image model, example concepts and an evaluator.

    default_model_path()   the bundled StableDiffusionPipeline folder (32x32 images, 8x8x4 latents)
    is_bundled_model(p)    whether p is that folder
    concepts()             names of the bundled example concepts
    concept(name)          Concept(name, images_dir, class_word, token)
    evaluate(...)          subject fidelity, prompt fidelity, preservation (see evaluator.py)

Modules: world.py (the generator), concept_specs.py (the example concepts, ``python -m
t2i_fast.toy.concept_specs``), pretrain.py (``python -m t2i_fast.toy.pretrain``), encoder.py (the evaluator's
image encoder), evaluator.py (``t2i-fast eval RUN``), validate.py.  No module is named like a function above,
so importing one never replaces that function on the package.
Importing this package imports neither torch nor diffusers (world.py, concept_specs.py: numpy only).
"""
from __future__ import annotations

__all__ = ["default_model_path", "is_bundled_model", "concepts", "concept", "evaluate", "Concept", "IMAGE_SIZE"]

from .concept_specs import Concept, concept, concepts
from .world import IMAGE_SIZE, default_model_path, is_bundled_model


def evaluate(pipeline_or_model_dir=None, token: str = "<sks>", class_word: str = "shape", concept_name=None,
             adapter_dir=None, **kw) -> dict:
    """evaluator.evaluate, imported on first call (it imports torch and diffusers)."""
    from .evaluator import evaluate as _evaluate

    return _evaluate(pipeline_or_model_dir, token, class_word, concept_name, adapter_dir=adapter_dir, **kw)
