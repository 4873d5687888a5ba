"""`t2i-fast train` with no --model or --images — the README's first command — end to end on a shortened
budget: the bundled toy model, its first example concept, LoRA at the toy learning rate, DVAR early stopping,
and a run folder whose adapter diffusers loads and whose report carries the evaluator's scores."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i_fast import toy
from t2i_fast.cli import main
from t2i_fast.adapter_files import load_lora_weights


def test_main_command_trains_the_bundled_concept(tmp_path, monkeypatch, one_thread, lora_notices, capsys):
    monkeypatch.chdir(tmp_path)
    from t2i_fast.toy import evaluator

    loads = []  # the evaluator loading an adapter itself
    monkeypatch.setattr(evaluator, "load_adapter", lambda *a, _load=evaluator.load_adapter, **k: loads.append(a) or _load(*a, **k))
    # the DVAR window is shortened with the cap, so the criterion can stop this run
    assert main(["train", "--max-steps", "80", "--dvar-window", "24", "--probe-every", "2"]) == 0
    out = tmp_path / "runs" / "t2i-fast"
    rep = json.loads((out / "report.json").read_text())

    cfg, concept = rep["config"], toy.concept(toy.concepts()[0])
    assert Path(cfg["model"]).resolve() == Path(toy.default_model_path()).resolve()
    assert Path(cfg["images"]) == concept.images_dir
    assert (cfg["token"], cfg["class_word"]) == (concept.token, concept.class_word)
    assert cfg["method"] == "lora" and cfg["early_stop"] == "dvar"
    assert (cfg["lr"], cfg["batch_size"]) == (1e-2, 4)  # app.TOY_DEFAULTS
    assert cfg["dvar_window"] == 24  # the flag over the toy default (60)

    for name in ("pytorch_lora_weights.safetensors", "samples.png", "dvar.png", "report.json", "eval.json"):
        assert name in rep["files"] and (out / name).is_file(), name
    es = rep["early_stop"]
    assert es["stop_step"] == rep["steps"] <= 80
    assert es["stopped_early"] == (rep["steps"] < 80) and len(es["l_det"]) == rep["steps"] // 2 + 1
    scores = rep["eval"]
    assert scores == json.loads((out / "eval.json").read_text())
    said = capsys.readouterr().out  # the last lines say why it stopped and what it scored
    assert f"toy evaluator: subject fidelity {scores['subject_fidelity']:.3f}" in said
    assert ("early stopping (DVAR): stopped at step" in said) == es["stopped_early"]
    for key in ("subject_fidelity", "prompt_fidelity", "preservation"):
        assert math.isfinite(scores[key]) and -1.0 <= scores[key] <= 1.0, key

    # the evaluator generated with the sample grid's pipeline, loading nothing itself; scoring the folder
    # afresh, with the evaluator's own loading, gives the same scores
    assert loads == []
    again = evaluator.evaluate_run(out)
    assert len(loads) == 1
    for key in ("subject_fidelity", "prompt_fidelity", "preservation", "subject_fidelity_attribute_prompts"):
        assert again[key] == pytest.approx(scores[key], abs=1e-6), key

    # the adapter loads with diffusers' own loader onto the bundled model and changes its image
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cfg["model"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe(f"a photo of {concept.token} {concept.class_word}", num_inference_steps=4, generator=g,
                    output_type="np").images[0]

    before = image()
    pipe.load_lora_weights(str(out))
    assert np.abs(image() - before).max() > 1e-3
    assert any("No LoRA keys associated to CLIPTextModel" in m for m in lora_notices)

    # our loader (sampling, evaluator) loads the same UNet-only file without that notice, and the same weights
    lora_notices.clear()
    ours = StableDiffusionPipeline.from_pretrained(cfg["model"], safety_checker=None)
    load_lora_weights(ours, out)
    assert lora_notices == []
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), ours.unet.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def lora_notices():
    """The messages that reach the handlers of diffusers' LoRA loading logger (after its own filters)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
