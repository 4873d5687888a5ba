"""selfattn_copy on the tiny model: the injected main pass starts exactly at the base model; it trains from
Python and the CLI, resumes exactly, writes its one documented file, samples through t2i_fast.sampling (the
reference reaches only prompts that hold the token), and refuses what it cannot do before writing anything."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import t2i_fast
from t2i_fast.errors import UserError
from t2i_fast.formats import read_safetensors
from t2i_fast.methods.selfattn_copy import (FILE, PROJECTIONS, CopyAttnProcessor, ReferenceInjector, SelfAttnCopy,
                                            resolution_level, self_attention_layers)

PROMPT, OTHER = "a photo of <sks> dog", "a photo of a cat"


def _cfg(base_cfg, **kw):
    return base_cfg.replace(method="selfattn_copy", lr=1e-2, early_stop="none", **kw)


def _image(pipe, prompt, steps=2):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, generator=gen, output_type="np").images[0]


@pytest.fixture(scope="module")
def trained(one_thread, tiny_model, concept_dir, tmp_path_factory):
    """A 3-step run at a high rate (the gates and LoRA move away from zero), shared by the tests below."""
    from t2i_fast import TrainConfig

    cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", resolution=32, max_steps=3,
                      num_samples=0, progress=False, lora_rank=8, method="selfattn_copy", lr=1e-2,
                      probe_every=1, out=str(tmp_path_factory.mktemp("sac") / "run"))  # DVAR's probe every step
    return t2i_fast.train(cfg)


@pytest.fixture(scope="module")
def base_pipe(one_thread, tiny_model):
    from t2i_fast.sampling import build_pipeline

    return build_pipeline(tiny_model, progress=False)


def test_the_main_pass_with_zero_lora_and_a_closed_gate_is_the_base_model(base_cfg, tiny_model, one_thread):
    from t2i_fast.data import tokenize
    from t2i_fast.models import load_components
    from t2i_fast.trainer import Trainer

    trainer = Trainer(_cfg(base_cfg))  # loads and patches the models; writes nothing
    unet, method = trainer.comps.unet, trainer.method
    runs, full_resolution_calls = [], []
    method.injector._run_copy = (lambda run: lambda *a: runs.append(1) or run(*a))(method.injector._run_copy)
    unet.up_blocks[-1].register_forward_hook(lambda *a: full_resolution_calls.append(1))
    base = load_components(tiny_model).unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    with torch.no_grad():
        text = method.encode_text(tokenize(trainer.comps.tokenizer, [PROMPT, OTHER]))
        want = base(x, t, text).sample
        got = unet(x, t, text).sample
        assert len(runs) == 1 and method.injector.mode == "off"  # a copy pass ran, then the main pass
        assert (got - want).abs().max() <= 1e-5
        for proc in method.injector.processors.values():
            proc.gate.fill_(0.5)
        full_resolution_calls.clear()
        opened = unet(x, t, text).sample
        # from the second call on the copy pass knows its last layer and stops before the full-resolution block
        assert len(runs) == 2 and len(full_resolution_calls) == 1
    assert (opened[0] - want[0]).abs().max() > 1e-3  # the token's row now sees the reference
    assert (opened[1] - want[1]).abs().max() <= 1e-5  # the row without the token stays the base model
    assert not (trainer.out).exists()


def test_trains_saves_the_documented_file_and_samples(trained, tiny_model, base_pipe):
    from t2i_fast.sampling import build_pipeline, load_adapter

    assert trained.steps == 3 and all(np.isfinite(trained.losses))
    assert [step for step, _ in trained.report["early_stop"]["l_det"]] == [0, 1, 2]  # the probe ran the method too
    assert FILE in trained.files and (trained.out / FILE).is_file()
    tensors, meta = read_safetensors(trained.out / FILE)
    layers = sorted({k.split(".to_")[0] for k in tensors if ".to_" in k})
    every = self_attention_layers(base_pipe.unet)
    assert layers == sorted(p for p in every if resolution_level(p, base_pipe.unet) > 0) and len(layers) == 1
    assert {resolution_level(p, base_pipe.unet) for p in every} == {0, 1}  # the full resolution is left out
    expected = {f"{p}.{proj}.lora_{ab}" for p in layers for proj in PROJECTIONS for ab in "AB"}
    expected |= {f"{p}.gate" for p in layers} | {"token_embedding", "reference.latents", "reference.noise"}
    assert set(tensors) == expected
    assert tensors[f"{layers[0]}.to_q.lora_A"].shape[0] == 8
    assert tensors["reference.latents"].shape == tensors["reference.noise"].shape == (1, 4, 16, 16)
    assert meta["t2i_fast.kind"] == "selfattn_copy" and json.loads(meta["t2i_fast.config"])["method"] == "selfattn_copy"
    assert {k: json.loads(meta[f"t2i_fast.{k}"]) for k in ("token", "reference", "gate", "rank", "full_resolution")} \
        == {"token": "<sks>", "reference": "noised", "gate": True, "rank": 8, "full_resolution": False}
    assert all(float(tensors[f"{p}.gate"].abs()) > 0 for p in layers)  # it trained
    assert any(tensors[f"{p}.{proj}.lora_B"].abs().max() > 0 for p in layers for proj in PROJECTIONS)

    pipe = build_pipeline(tiny_model, trained.out, progress=False)
    assert load_adapter.__module__ == "t2i_fast.sampling" and "<sks>" in pipe.tokenizer.get_vocab()
    assert np.abs(_image(pipe, PROMPT) - _image(base_pipe, PROMPT)).max() > 1e-3
    np.testing.assert_allclose(_image(pipe, OTHER), _image(base_pipe, OTHER), atol=1e-6)  # no token: the base model
    with pytest.raises(UserError, match="holds a selfattn_copy adapter already"):
        load_adapter(pipe, trained.out)


def test_a_file_made_for_another_model_is_refused_in_one_line(trained, tiny_model, tmp_path):
    import shutil

    from t2i_fast.formats import atomic_save
    from t2i_fast.sampling import build_pipeline

    tensors, meta = read_safetensors(trained.out / FILE)
    key = next(k for k in tensors if k.endswith("to_k.lora_A"))
    tensors[key] = tensors[key][:, :-1]  # as another model's narrower layer would have it
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    atomic_save(tensors, run / FILE, meta)
    with pytest.raises(UserError, match="do not fit this model's layer") as e:
        build_pipeline(tiny_model, run, progress=False)
    assert "\n" not in str(e.value) and "another base model" in str(e.value)


def test_the_toy_evaluator_loads_it_through_the_methods_loader(trained, tiny_model, tmp_path):
    from t2i_fast.sampling import build_pipeline
    from t2i_fast.toy.evaluator import load_adapter

    pipe = build_pipeline(tiny_model, progress=False)
    assert load_adapter(pipe, trained.out) == [FILE]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no adapter"):
        load_adapter(pipe, tmp_path / "empty")


def test_cli_trains_resumes_exactly_and_samples(tiny_model, concept_dir, tmp_path, one_thread, capsys):
    from t2i_fast.cli import main

    common = ["train", "--method", "selfattn_copy", "--model", tiny_model, "--images", concept_dir, "--class-word",
              "dog", "--resolution", 32, "--num-samples", 0, "--no-progress", "--lr", 1e-2, "--lora-rank", 4,
              "--early-stop", "none"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main([*map(str, common), "--max-steps", "2", "--out", str(resumed)]) == 0
    assert json.loads((resumed / "report.json").read_text())["steps"] == 2
    assert main([*map(str, common), "--max-steps", "4", "--out", str(resumed), "--resume"]) == 0
    assert main([*map(str, common), "--max-steps", "4", "--out", str(straight)]) == 0
    report = json.loads((resumed / "report.json").read_text())
    assert report["steps"] == 4 and report["method"] == "selfattn_copy" and np.isfinite(report["final_loss"])
    a, b = read_safetensors(resumed / FILE)[0], read_safetensors(straight / FILE)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    capsys.readouterr()
    assert main(["sample", "--model", str(tiny_model), "--adapter", str(resumed), "--prompt", PROMPT, "--n", "1",
                 "--steps", "2", "--out", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "grid.png").is_file()


def test_the_ablations_and_a_two_vector_token_save_what_they_trained_and_sampling_follows_the_file(
        base_cfg, tiny_model, base_pipe, monkeypatch, one_thread):
    from t2i_fast.sampling import build_pipeline

    monkeypatch.setattr(SelfAttnCopy, "reference", "clean")
    monkeypatch.setattr(SelfAttnCopy, "gate", False)
    monkeypatch.setattr(SelfAttnCopy, "full_resolution", True)
    result = t2i_fast.train(_cfg(base_cfg, max_steps=2, lora_rank=1, num_vectors=2))
    tensors, meta = read_safetensors(result.out / FILE)
    assert not any(k.endswith(".gate") for k in tensors) and "reference.noise" not in tensors
    every = self_attention_layers(base_pipe.unet)
    assert {k.split(".to_")[0] for k in tensors if ".to_" in k} == set(every) and json.loads(
        meta["t2i_fast.full_resolution"]) is True  # every attn1, the full-resolution ones too
    assert tensors["token_embedding"].shape[0] == 2  # a two-vector identifier: <sks> <sks>_1 in prompts
    assert json.loads(meta["t2i_fast.reference"]) == "clean" and json.loads(meta["t2i_fast.gate"]) is False
    monkeypatch.undo()  # sampling reads the file, not the class

    runs = []
    real = ReferenceInjector._run_copy
    monkeypatch.setattr(ReferenceInjector, "_run_copy", lambda self, *a: runs.append(1) or real(self, *a))
    pipe = build_pipeline(tiny_model, result.out, progress=False)
    assert {name for name, m in pipe.unet.named_modules()
            if isinstance(getattr(m, "processor", None), CopyAttnProcessor)} == set(every)  # as the file says
    with_token = _image(pipe, PROMPT, steps=3)
    assert len(runs) == 1  # a clean reference: one copy pass for all the steps
    assert np.abs(with_token - _image(base_pipe, PROMPT, steps=3)).max() > 1e-3  # no gate: open from the start
    np.testing.assert_allclose(_image(pipe, PROMPT, steps=3), with_token, atol=1e-6)  # from the cache
    assert len(runs) == 1


def test_noised_reference_samples_one_copy_pass_per_step_then_reuses_them(trained, tiny_model, monkeypatch):
    from t2i_fast.sampling import build_pipeline

    runs = []
    real = ReferenceInjector._run_copy
    monkeypatch.setattr(ReferenceInjector, "_run_copy", lambda self, *a: runs.append(1) or real(self, *a))
    pipe = build_pipeline(tiny_model, trained.out, progress=False)
    first = _image(pipe, PROMPT, steps=3)
    assert len(runs) == 3
    np.testing.assert_allclose(_image(pipe, PROMPT, steps=3), first, atol=1e-6)
    assert len(runs) == 3
    _image(pipe, OTHER, steps=3)  # no token in the prompt: no copy pass at all
    assert len(runs) == 3
    from t2i_fast.data import tokenize

    with torch.no_grad():  # prompt features reweighted outside the text encoder match none it produced
        weighted = pipe.text_encoder(tokenize(pipe.tokenizer, [PROMPT]))[0] * 1.2
    with pytest.warns(UserWarning, match="reference is not injected"):
        pipe(prompt_embeds=weighted, num_inference_steps=1, height=32, width=32)
    assert len(runs) == 3


def _model_with_self_attention(path, only_cross_attention):
    """The tiny model with each down block's attn1 attending to the text where only_cross_attention says so
    (the up blocks mirror it); the mid block (whose attn1 would stay self-attention) is left out."""
    from diffusers import UNet2DConditionModel

    from t2i_fast.testing import build_pipeline

    pipe = build_pipeline("tiny")
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "only_cross_attention": only_cross_attention,
                                        "mid_block_type": None})
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("change, needle", [
    (dict(gradient_checkpointing=True), "--gradient-checkpointing is not supported by selfattn_copy"),
    (dict(train_text_encoder=True), "--train-text-encoder is not supported by selfattn_copy"),
    (dict(template="a photo of a {cls}"), "has no {token}"),
    (True, "has no self-attention layers (attn1)"),
    ((False, True), "has self-attention only at its full resolution"),
], ids=["gradient-checkpointing", "train-text-encoder", "template-without-token", "model-without-self-attention",
        "self-attention-only-at-full-resolution"])
def test_bad_input_is_one_line_before_anything_is_written(base_cfg, tmp_path, change, needle, one_thread):
    if not isinstance(change, dict):  # only_cross_attention of a model made for the case
        change = dict(model=str(_model_with_self_attention(tmp_path / "model", change)))
    with pytest.raises(UserError, match=needle.replace("{", r"\{").replace("(", r"\(").replace(")", r"\)")) as e:
        t2i_fast.train(_cfg(base_cfg, **change))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_cli_refusal_is_one_line_with_exit_status_2(tiny_model, concept_dir, tmp_path, capsys):
    from t2i_fast.cli import main

    out = tmp_path / "out"
    code = main(["train", "--method", "selfattn_copy", "--model", str(tiny_model), "--images", str(concept_dir),
                 "--resolution", "32", "--no-progress", "--gradient-checkpointing", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --gradient-checkpointing is not supported by selfattn_copy")
    assert not out.exists()


def test_t2i_fast_eval_scores_a_run_on_the_bundled_model(tmp_path, one_thread):
    import t2i_fast.toy as toy
    from t2i_fast import TrainConfig
    from t2i_fast.toy import evaluator

    model = toy.default_model_path()
    if not (model / "model_index.json").is_file():
        pytest.skip("bundled toy model not built (python -m t2i_fast.toy.pretrain)")
    name = toy.concepts()[0]
    c = toy.concept(name)
    cfg = TrainConfig(model=str(model), images=str(c.images_dir), token=c.token, class_word=c.class_word,
                      method="selfattn_copy", max_steps=2, early_stop="none", num_samples=0, progress=False,
                      out=str(tmp_path / "run"))
    run = t2i_fast.train(cfg).out
    assert evaluator.main([str(run), "--n-images", "1", "--steps", "2"]) == 0
    scores = json.loads((run / "eval.json").read_text())
    assert all(np.isfinite(scores[k]) for k in ("subject_fidelity", "prompt_fidelity", "preservation"))
    assert scores["preservation"] > 0.95  # prompts without the token are the base model's
