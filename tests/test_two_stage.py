"""Two-stage personalization on the tiny model: one call runs textual inversion, then a UNet fine-tune with
that embedding frozen; both stages resume; the combined files load in diffusers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from t2i_fast import TrainConfig, train
from t2i_fast.errors import UserError
from t2i_fast.formats import LORA_FILE, TI_FILE
from t2i_fast.trainer import Trainer


@pytest.fixture
def ts_cfg(base_cfg):
    return base_cfg.replace(method="two_stage", stage1_steps=2, stage1_lr=5e-2, stage2_steps=2, stage2_lr=1e-2,
                            early_stop="none")


@pytest.fixture(scope="module")
def straight(tiny_model, concept_dir, tmp_path_factory):
    """One uninterrupted two-stage run (2 + 2 steps), shared by the tests below."""
    from t2i_fast import TrainConfig

    cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", resolution=32,
                      num_samples=0, progress=False, lora_rank=8, method="two_stage", stage1_steps=2,
                      stage1_lr=5e-2, stage2_steps=2, stage2_lr=1e-2, early_stop="none",
                      out=str(tmp_path_factory.mktemp("two_stage") / "straight"))
    return train(cfg)


def _image(pipe, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images[0]


def test_runs_both_stages_and_loads_in_diffusers(straight, tiny_model):
    from diffusers import StableDiffusionPipeline

    from t2i_fast.sampling import load_adapter

    result = straight
    out = result.out
    assert result.steps == 4 and len(result.losses) == 4
    for name in ("stage1/" + TI_FILE, "stage2/" + LORA_FILE, TI_FILE, LORA_FILE, "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "two_stage" and set(report["stages"]) == {"stage1", "stage2"}
    s1, s2 = report["stages"]["stage1"]["config"], report["stages"]["stage2"]["config"]
    assert (s1["method"], s1["max_steps"], s1["lr"]) == ("textual_inversion", 2, 5e-2)
    assert (s2["method"], s2["max_steps"], s2["lr"]) == ("lora", 2, 1e-2)
    assert s2["init_embeddings"].endswith("stage1/" + TI_FILE) and not s2["class_images"]
    # stage 2 trains the UNet only: no text-encoder LoRA, the stage-1 vectors are published unchanged
    assert all(k.startswith("unet.") for k in load_file(out / LORA_FILE))
    torch.testing.assert_close(load_file(out / TI_FILE)["<sks>"], load_file(out / "stage1" / TI_FILE)["<sks>"])

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = _image(pipe, "a photo of dog")
    assert load_adapter(pipe, out) == [TI_FILE, LORA_FILE]
    assert np.abs(_image(pipe, "a photo of <sks> dog") - base).max() > 1e-3


def test_stage2_text_encoder_holds_the_frozen_stage1_embedding(ts_cfg, tmp_path):
    from t2i_fast.formats import save_textual_inversion

    vectors = torch.randn(2, 32)
    save_textual_inversion(tmp_path / TI_FILE, "<sks>", vectors)
    trainer = Trainer(ts_cfg.replace(method="lora", init_embeddings=str(tmp_path / TI_FILE)))
    te, tok = trainer.comps.text_encoder, trainer.comps.tokenizer
    rows = te.get_input_embeddings().weight[tok.convert_tokens_to_ids(["<sks>", "<sks>_1"])]
    torch.testing.assert_close(rows, vectors)
    assert trainer.streams[0].prompts == ["a photo of <sks> <sks>_1 dog"]  # multi-vector token written out
    assert not trainer.method.trains_text_encoder and not any(p.requires_grad for p in te.parameters())


def test_both_stages_resume(ts_cfg, tmp_path, straight, monkeypatch):
    started = []  # (stage folder, resume, overwrite) of every stage that trains
    init = Trainer.__init__

    def spy(self, cfg, *args, **kw):
        started.append((Path(cfg.out).name, cfg.resume, cfg.overwrite))
        init(self, cfg, *args, **kw)

    monkeypatch.setattr(Trainer, "__init__", spy)
    full = ts_cfg.replace(stage1_steps=2, stage2_steps=2)
    split = tmp_path / "split"
    train(full.replace(out=str(split), stage1_steps=1, stage2_steps=1))
    # stage 1 continues from its step-1 checkpoint; stage 2 starts afresh (its input embedding changed)
    started.clear()
    train(full.replace(out=str(split), stage2_steps=1, resume=True))
    assert started == [("stage1", True, False), ("stage2", False, True)]
    # stage 1 is finished and unchanged (a new stage-2 budget does not make it stale): skipped; stage 2
    # continues from its step-1 checkpoint
    started.clear()
    resumed = train(full.replace(out=str(split), resume=True, sample_steps=3))
    assert started == [("stage2", True, False)]
    assert len((split / "stage1" / "log.jsonl").read_text().splitlines()) == 2
    assert resumed.steps == 4
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)
    for name in (TI_FILE, LORA_FILE):
        a, b = load_file(straight.out / name), load_file(resumed.out / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_full_unet_stage2_is_a_pipeline_with_the_token(ts_cfg, tiny_model):
    from diffusers import StableDiffusionPipeline

    from t2i_fast.sampling import load_adapter

    result = train(ts_cfg.replace(stage1_steps=1, stage2_steps=1, stage2_unet="full", stage2_lr=1e-3))
    out = result.out
    assert (out / TI_FILE).is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    emb = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
    torch.testing.assert_close(emb[None], load_file(out / TI_FILE)["<sks>"])
    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert load_adapter(base, out) == ["unet", "text_encoder", "tokenizer"]  # the token is in its tokenizer


def test_token_already_in_vocabulary_is_refused_and_nothing_written(ts_cfg, tmp_path, capsys):
    from t2i_fast.cli import main

    out = tmp_path / "refused"
    argv = ["train", "--method", "two_stage", "--token", "a", "--model", ts_cfg.model, "--images", ts_cfg.images,
            "--class-word", "dog", "--resolution", "32", "--out", str(out), "--no-progress", "--num-samples", "0"]
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: --token 'a' is already in the tokenizer's vocabulary")
    assert not out.exists()
    with pytest.raises(UserError, match="several trainings in a row"):
        Trainer(ts_cfg)
    with pytest.raises(UserError, match="--stage2-unet"):
        train(ts_cfg.replace(stage2_unet="qlora"))


def test_bundled_model_run_is_scored_once_on_the_combined_files(tmp_path, one_thread):
    from t2i_fast import app

    out = tmp_path / "ts"
    run = app.train(TrainConfig(method="two_stage", stage1_steps=2, stage2_steps=2, early_stop="none",
                                num_samples=0, progress=False, out=str(out)))
    assert "eval.json" in run.files and (out / "eval.json").is_file()
    assert json.loads((out / "report.json").read_text())["eval"] == json.loads((out / "eval.json").read_text())
    assert not (out / "stage1" / "eval.json").exists() and not (out / "stage2" / "eval.json").exists()
