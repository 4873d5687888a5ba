"""The toy evaluator: its encoder separates concepts, and it separates a trained run from the base model."""
from __future__ import annotations

import json

import numpy as np
import pytest

import t2i_fast.toy as toy
from t2i_fast.toy import concept_specs as C
from t2i_fast.toy import evaluator as V

MODEL = toy.default_model_path()
ENCODER = MODEL.parent / "encoder.safetensors"
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").exists() or not ENCODER.exists(),
                                 reason="bundled toy model not built (python -m t2i_fast.toy.pretrain)")
CONCEPT = "teal_ring"
LORA_STEPS = 400  # quick_lora's default; ~2 min on a shared 2-core CPU, hence the slow mark
MARGIN = 0.2  # subject fidelity, trained minus base; measured +0.48 on teal_ring (VALIDATION.md)


@needs_model
def test_references_are_closer_to_themselves_than_to_other_concepts():
    from t2i_fast.toy.encoder import embed

    names = toy.concepts()
    embs = {n: embed(C.load_images(n)) for n in names}
    for a in names:
        s = embs[a] @ embs[a].T
        k = len(s)
        self_sim = float((s.sum() - s.diagonal().sum()) / (k * (k - 1)))
        other = max(float((embs[a] @ embs[b].T).mean()) for b in names if b != a)
        assert self_sim > other, (a, self_sim, other)


def test_package_api_is_callable_after_submodule_imports():
    import t2i_fast.toy.concept_specs  # noqa: F401
    import t2i_fast.toy.evaluator  # noqa: F401

    assert callable(toy.evaluate) and callable(toy.concepts)
    assert sorted(toy.concepts()) == sorted(C.SPECS) and toy.concepts()[0] == C.DEFAULT


def test_the_evaluator_loads_runs_as_sample_does():
    """One loader of run folders: the evaluator scores what `t2i-fast sample` would draw, for every method."""
    from t2i_fast import sampling
    from t2i_fast.toy import evaluator

    assert evaluator.load_adapter is sampling.load_adapter


def test_attribute_reader_on_world_images():
    from t2i_fast.toy import world

    img = world.render("circle", world.COLORS["red"], world.BACKGROUNDS["black"], (0.5, 0.5), 0.3)
    assert V.attribute_ok(img, "background", "black") and V.attribute_ok(img, "color", "red")
    assert not V.attribute_ok(img, "color", "blue")


def _run(tmp_path_factory, steps: int):
    """A LoRA run on one concept, in the layout `t2i-fast train` writes (report.json + adapter)."""
    from t2i_fast.toy.validate import quick_lora

    spec = toy.concept(CONCEPT)
    run = tmp_path_factory.mktemp(f"run{steps}")
    token = "ringzq"  # the token VALIDATION.md used
    quick_lora(CONCEPT, run, token, steps=steps)
    cfg = dict(model=str(MODEL), images=str(spec.images_dir), token=token, class_word=spec.class_word, method="lora")
    (run / "report.json").write_text(json.dumps(dict(config=cfg)))
    return run, token, spec.class_word


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return _run(tmp_path_factory, LORA_STEPS)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tmp_path_factory, 2)


@needs_model
@pytest.mark.slow
def test_evaluator_separates_trained_from_base(trained_run):
    run, token, cls = trained_run
    kw = dict(n_images=4, num_inference_steps=12)
    base = toy.evaluate(None, token, cls, CONCEPT, preservation=False, **kw)
    trained = toy.evaluate(None, token, cls, CONCEPT, adapter_dir=run, **kw)
    assert trained["subject_fidelity"] > base["subject_fidelity"] + MARGIN, (base, trained)
    assert 0.0 <= trained["prompt_fidelity"] <= 1.0
    assert 0.5 < trained["preservation"] <= 1.0 + 1e-6


@needs_model
def test_eval_cli_on_a_run_folder(tiny_run):
    run, _, _ = tiny_run
    assert V.main([str(run), "--n-images", "1", "--steps", "3"]) == 0
    res = json.loads((run / "eval.json").read_text())
    for k in ("subject_fidelity", "prompt_fidelity", "preservation"):
        assert np.isfinite(res[k])
    assert res["preservation"] > 0.95  # two LoRA steps barely move the model
    assert V.main([str(run / "missing")]) == 2


@needs_model
def test_base_images_are_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path))
    prompts, seeds = ["a red circle on a white background"] * 2, [0, 1]
    first = V.base_images(None, MODEL, prompts, seeds, 3, V.GUIDANCE)
    assert first.shape[0] == 2 and len(list((tmp_path / "toy-eval-base").glob("*.npy"))) == 1

    def generated_again(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(V, "generate", generated_again)
    np.testing.assert_array_equal(V.base_images(None, MODEL, prompts, seeds, 3, V.GUIDANCE), first)
    with pytest.raises(AssertionError, match="generated again"):  # other seeds: another key
        V.base_images(None, MODEL, prompts, [0, 2], 3, V.GUIDANCE)
