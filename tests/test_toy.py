"""The toy world: generator, tokenizer, example concepts and the bundled pretrained pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

import t2i_fast.toy as toy
from t2i_fast.toy import world

MODEL = toy.default_model_path()
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").exists(),
                                 reason="bundled toy model not built (python -m t2i_fast.toy.pretrain)")


def test_generator_is_deterministic():
    a, sa = world.generate(16, seed=3)
    b, sb = world.generate(16, seed=3)
    c, _ = world.generate(16, seed=4)
    assert a.shape == (16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_captions_name_the_drawn_attributes():
    _, scenes = world.generate(200, seed=0)
    for s in scenes:
        words = s.caption.split()
        assert s.shape in words or "shape" in words
        for w in words:
            assert w in world.VOCABULARY, (w, s.caption)
        if s.color in words:
            assert s.caption.index(s.color) < s.caption.index(s.shape if s.shape in words else "shape")
        if "background" in words:
            assert f"on a {s.background} background" in s.caption


def test_attributes_read_back_from_pixels():
    imgs, scenes = world.generate(150, seed=7)
    for key in ("shape", "color", "background"):
        acc = np.mean([world.read_attributes(im)[key] == getattr(s, key) for im, s in zip(imgs, scenes)])
        assert acc >= 0.95, (key, acc)


def test_tokenizer_words_are_single_tokens_and_new_tokens_work():
    from t2i_fast.toy.pretrain import build_tokenizer

    tok = build_tokenizer()
    for w in world.VOCABULARY:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    assert len(tok("xyzzy", add_special_tokens=False).input_ids) > 1  # unknown words still tokenize
    n = len(tok)
    assert tok.add_tokens(["<sks>"]) == 1
    assert tok.tokenize("a photo of <sks> circle") == ["a</w>", "photo</w>", "of</w>", "<sks>", "circle</w>"]
    assert len(tok) == n + 1


def test_concepts_are_shipped_novel_and_regenerable():
    from t2i_fast.toy.concept_specs import SPECS, render_concept, load_images

    names = toy.concepts()
    assert len(names) >= 6
    for name in names:
        c = toy.concept(name)
        meta = json.loads((c.images_dir / "concept.json").read_text())
        assert c.class_word in world.VOCABULARY and c.token.startswith("<")
        imgs = load_images(c.images_dir)
        assert 4 <= len(imgs) <= 6
        spec = SPECS[name]
        # not in the pretraining world: a new shape or a pattern / colour the world never draws
        assert spec["shape"] not in world.SHAPES or spec["pattern"] != "solid", name
        # the shipped PNGs are exactly what the generator makes
        assert np.array_equal(np.stack(render_concept(name, n=meta["n_images"], seed=meta["seed"])), imgs)
        # varied backgrounds
        assert len({world.read_background(im) for im in imgs}) >= 2
    with pytest.raises(KeyError):
        toy.concept("no_such_concept")


def test_no_submodule_shadows_the_package_functions():
    """Importing a submodule binds it on the package under its own name: none may be named like a public name."""
    import importlib
    import inspect
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(toy.__path__)}
    assert {"world", "concept_specs", "evaluator"} <= submodules
    for name in sorted(submodules):
        importlib.import_module(f"{toy.__name__}.{name}")
    assert all(inspect.isfunction(f) for f in (toy.concepts, toy.concept, toy.evaluate))
    assert not set(toy.__all__) & submodules
    assert toy.concept(toy.concepts()[0]).name == toy.concepts()[0] and isinstance(toy.concept("moon"), toy.Concept)


@needs_model
def test_bundled_model_is_small_and_loads_like_sd():
    from diffusers import StableDiffusionPipeline

    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    total += sum(p.stat().st_size for p in MODEL.parent.glob("encoder.*"))
    assert total <= 25 * 2 ** 20, total
    for sub in ("unet", "vae", "text_encoder"):
        assert list((MODEL / sub).glob("*.safetensors")), sub
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == world.IMAGE_SIZE
    for w in world.VOCABULARY:
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1


@needs_model
def test_bundled_model_loads_through_the_library_loader():
    from t2i_fast.models import load_components

    comp = load_components(str(MODEL))
    assert comp.unet.config.sample_size == 8 and comp.vae.config.latent_channels == 4
    assert comp.tokenizer("a red circle", add_special_tokens=False).input_ids == \
        comp.tokenizer.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"])


@needs_model
def test_short_generation_is_deterministic():
    import torch

    from t2i_fast.toy.evaluator import generate, load_pipeline

    pipe = load_pipeline()
    a = generate(pipe, ["a red circle on a white background"], [5], steps=3)
    b = generate(pipe, ["a red circle on a white background"], [5], steps=3)
    c = generate(pipe, ["a red circle on a white background"], [6], steps=3)
    assert a.shape == (1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the plain pipeline call, as a user would make it
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = pipe("a blue square", num_inference_steps=2, generator=g(), output_type="np").images
    y = pipe("a blue square", num_inference_steps=2, generator=g(), output_type="np").images
    assert np.array_equal(x, y)
