"""E4T (encoder-based domain tuning) on the tiny model: the weight offset W0 ⊙ (1 + B A) starts exactly at the
base layer, matches a hand-written twin and folds into a plain UNet with the same output; domain pre-training
writes its documented files, refuses to overwrite them, and resumes an interrupted run exactly (from Python and
the CLI, whose bad input is one line with exit status 2); tuning starts from the domain on the first image,
saves the documented file, resumes exactly and samples through t2i_fast.sampling; a missing domain, one made for
another model and unsupported options are refused before anything is written; the ablation switches save what
they trained."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t2i_fast
from t2i_fast.e4t_domain import (DOMAIN_FILE, SCALE, EncoderHead, OffsetLinear, attention_projections, fold_offsets,
                                 image_features, install_offsets, offset_state, class_embedding)
from t2i_fast.e4t_pretrain import CHECKPOINT, REPORT, pretrain
from t2i_fast.errors import UserError
from t2i_fast.formats import read_safetensors
from t2i_fast.methods import e4t as e4t_module
from t2i_fast.methods.e4t import E4T, FILE
from t2i_fast.testing import save_pipeline, write_concept_images

PROMPT, OTHER = "a photo of <sks> dog", "a photo of a cat"
# the settings of every pre-training below: the resume test continues a run made with them
PRETRAIN = dict(class_word="dog", steps=4, batch_size=2, lr=1e-2, rank=2, resolution=32, checkpoint_every=2,
                progress=False, device="cpu")


def _domain_images(folder: Path, concepts: int = 4) -> Path:
    """A domain folder: `concepts` concept folders of 2 images each (a differently placed square per seed)."""
    for k in range(concepts):
        write_concept_images(folder / f"concept_{k}", n=2, size=64, seed=k)
    return folder


def _cfg(base_cfg, domain, **kw):
    return base_cfg.replace(**{"method": "e4t", "domain": str(domain), "max_steps": 3, "num_samples": 0, "lr": 1e-2,
                               **kw})


def _image(pipe, prompt, steps=2):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, generator=gen, output_type="np").images[0]


@pytest.fixture(scope="module")
def domain_images(tmp_path_factory):
    return _domain_images(tmp_path_factory.mktemp("e4t_domain_images"))


@pytest.fixture(scope="module")
def domain(one_thread, tiny_model, domain_images, tmp_path_factory):
    """A finished 4-step pre-training (checkpoints every 2 steps) of the tiny model: its output folder."""
    out = tmp_path_factory.mktemp("e4t_domain") / "domain"
    pretrain(str(tiny_model), str(domain_images), out=str(out), **PRETRAIN)
    return out


@pytest.fixture(scope="module")
def tuned(one_thread, tiny_model, concept_dir, domain, tmp_path_factory):
    """A 3-step tuning at a high rate from the domain, shared by the sampling tests."""
    from t2i_fast import TrainConfig

    cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", resolution=32, max_steps=3,
                      num_samples=0, progress=False, method="e4t", domain=str(domain), lr=1e-2,
                      out=str(tmp_path_factory.mktemp("e4t_run") / "run"))
    return t2i_fast.train(cfg)


@pytest.fixture(scope="module")
def base_pipe(one_thread, tiny_model):
    from t2i_fast.sampling import build_pipeline

    return build_pipeline(tiny_model, progress=False)


# ------------------------------------------------------------------------------------------ the weight offset
def _twin(x, w0, bias, a, b):
    """F.linear(x, W0 ⊙ (1 + B A), bias), written out entry by entry."""
    w = torch.empty_like(w0)
    for o in range(w0.shape[0]):
        for i in range(w0.shape[1]):
            w[o, i] = w0[o, i] * (1 + sum(b[o, r] * a[r, i] for r in range(a.shape[0])))
    return x @ w.T + bias


def test_offset_linear_starts_at_its_base_layer_and_matches_a_hand_written_twin():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = OffsetLinear(copy.deepcopy(base), rank=3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base layer
    assert (layer.in_features, layer.out_features) == (8, 6) and torch.equal(layer.weight, w0)
    assert layer.lora_A.shape == (3, 8) and layer.lora_B.shape == (6, 3) and not layer.lora_B.any()
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad

    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(3, 8))
        layer.lora_B.copy_(torch.randn(6, 3) * 0.3)
    got = layer(x)
    want = _twin(x, w0, b0, layer.lora_A.detach(), layer.lora_B.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w0 * (1 + layer.lora_B @ layer.lora_A), b0))
    assert (got - base(x)).abs().max() > 1e-2  # the offset does change the layer
    got.sum().backward()
    assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0
    assert layer.base.weight.grad is None and torch.equal(layer.base.weight, w0)  # the base stays frozen


def test_fold_offsets_into_a_plain_unet_gives_the_offset_unets_output(tiny_model, one_thread):
    from t2i_fast.models import load_components

    unet = load_components(tiny_model).unet
    plain = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        base_out = plain(x, t, text).sample
        layers = install_offsets(unet, rank=2, seed=0)
        assert set(layers) == set(attention_projections(plain)) and len(layers) == 4 * 2 * 3
        # 4 transformer blocks (down, mid, 2 up) x attn1 / attn2 x to_q / to_k / to_v
        assert torch.equal(unet(x, t, text).sample, base_out)  # B = 0: the UNet is unchanged
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        offset_out = unet(x, t, text).sample
        assert (offset_out - base_out).abs().max() > 1e-3
        tensors = {k: v.detach().clone() for k, v in offset_state(layers).items()}
        assert fold_offsets(plain, tensors, Path("offsets.safetensors")) == len(layers)
        assert not any(isinstance(m, OffsetLinear) for m in plain.modules())  # a plain diffusers UNet
        torch.testing.assert_close(plain(x, t, text).sample, offset_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="holds E4T offsets already"):
        install_offsets(unet, rank=2)


def test_fold_offsets_checks_every_layer_before_changing_one(tiny_model, one_thread):
    from t2i_fast.models import load_components

    unet = load_components(tiny_model).unet
    layers = attention_projections(unet)
    first, second = sorted(layers)[:2]
    before = {k: m.weight.detach().clone() for k, m in layers.items()}
    good = {f"{first}.lora_A": torch.ones(1, layers[first].in_features),
            f"{first}.lora_B": torch.ones(layers[first].out_features, 1)}
    narrow = {f"{second}.lora_A": torch.ones(1, layers[second].in_features - 1),
              f"{second}.lora_B": torch.ones(layers[second].out_features, 1)}
    with pytest.raises(UserError, match=r"do not fit this model's layer .*load it with the model it was trained on"):
        fold_offsets(unet, {**good, **narrow}, Path("x.safetensors"))
    with pytest.raises(UserError, match="lacks half of the offset of"):
        fold_offsets(unet, {**good, f"{second}.lora_A": torch.ones(1, layers[second].in_features)}, Path("x"))
    with pytest.raises(UserError, match="has offsets for down_blocks.9.attn, which this model lacks"):
        fold_offsets(unet, {**good, "down_blocks.9.attn.lora_A": torch.ones(1, 1),
                            "down_blocks.9.attn.lora_B": torch.ones(1, 1)}, Path("x"))
    for k, m in layers.items():  # nothing was folded, not even the layer that fits
        assert torch.equal(m.weight, before[k]), k
    assert fold_offsets(unet, good, Path("x")) == 1
    torch.testing.assert_close(layers[first].weight, before[first] * 2)  # W0 ⊙ (1 + 1)


# -------------------------------------------------------------------------------------- domain pre-training
def test_pretrain_writes_the_domain_file_and_its_report(domain, tiny_model):
    tensors, meta = read_safetensors(domain / DOMAIN_FILE)
    assert meta["t2i_fast.kind"] == "e4t_domain"
    info = {k: json.loads(meta[f"t2i_fast.{k}"]) for k in ("model", "class_word", "rank", "steps", "concepts",
                                                           "images", "resolution", "scale")}
    assert info == {"model": str(tiny_model), "class_word": "dog", "rank": 2, "steps": 4, "concepts": 4,
                    "images": 8, "resolution": 32, "scale": SCALE}
    assert isinstance(json.loads(meta["t2i_fast.fingerprint"]), list)
    from t2i_fast.models import load_components

    projections = attention_projections(load_components(tiny_model).unet)
    offsets = {k for k in tensors if not k.startswith("encoder.")}
    assert offsets == {f"{p}.lora_{ab}" for p in projections for ab in "AB"}
    assert tensors[f"{sorted(projections)[0]}.lora_A"].shape[0] == 2
    # the head's last layer starts at zero; after training it is not (nor are the offsets' B)
    assert tensors["encoder.net.3.weight"].shape == (32, 256) and tensors["encoder.net.3.weight"].abs().max() > 0
    assert any(tensors[k].abs().max() > 0 for k in offsets if k.endswith("lora_B"))
    report = json.loads((domain / REPORT).read_text())
    assert report["steps"] == 4 and report["concepts"] == 4 and report["images"] == 8
    assert np.isfinite(report["loss_first_100"]) and report["file_bytes"] == (domain / DOMAIN_FILE).stat().st_size
    assert "fingerprint" not in report
    assert not (domain / CHECKPOINT).exists()  # a finished run leaves no checkpoint


def test_pretrain_again_without_overwrite_is_refused_and_leaves_the_file(domain, tiny_model, domain_images):
    before = (domain / DOMAIN_FILE).read_bytes()
    with pytest.raises(UserError, match=r"e4t_domain.safetensors exists; pass --overwrite"):
        pretrain(str(tiny_model), str(domain_images), out=str(domain), **PRETRAIN)
    with pytest.raises(UserError, match=r"--resume: no e4t_pretrain_checkpoint.pt in"):
        pretrain(str(tiny_model), str(domain_images), out=str(domain), resume=True, **PRETRAIN)
    assert (domain / DOMAIN_FILE).read_bytes() == before


def test_an_interrupted_pretraining_resumes_exactly(domain, tiny_model, domain_images, tmp_path, monkeypatch,
                                                   one_thread):
    """A finished run deletes its checkpoint, so the run is interrupted (as Ctrl-C would) during step 3, after
    the step-2 checkpoint; --resume then finishes it, and it must equal the uninterrupted run of `domain`."""
    import t2i_fast.e4t_pretrain as module

    real, calls = module.diffusion_loss, []

    def interrupted_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(module, "diffusion_loss", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(str(tiny_model), str(domain_images), out=str(out), **PRETRAIN)
    monkeypatch.undo()
    assert (out / CHECKPOINT).is_file() and not (out / DOMAIN_FILE).exists()
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2

    with pytest.raises(UserError, match="was made with other settings; start again with --overwrite"):
        pretrain(str(tiny_model), str(domain_images), out=str(out), resume=True, **{**PRETRAIN, "lr": 1e-3})
    report = pretrain(str(tiny_model), str(domain_images), out=str(out), resume=True, **PRETRAIN)
    assert report["steps"] == 4 and not (out / CHECKPOINT).exists()
    straight = json.loads((domain / REPORT).read_text())
    assert report["loss_first_100"] == straight["loss_first_100"]  # the losses before the interruption are kept
    resumed, _ = read_safetensors(out / DOMAIN_FILE)
    want, _ = read_safetensors(domain / DOMAIN_FILE)
    assert set(resumed) == set(want)
    for key in want:
        assert torch.equal(resumed[key], want[key]), key


def test_cli_pretrains_from_concept_folders_and_a_flat_folder_with_captions(tiny_model, domain_images, tmp_path,
                                                                            capsys, one_thread):
    from t2i_fast.cli import main

    common = ["--model", str(tiny_model), "--class-word", "dog", "--steps", "2", "--batch-size", "2",
              "--resolution", "32", "--rank", "1", "--no-progress", "--device", "cpu"]
    out = tmp_path / "cli"
    assert main(["pretrain-e4t", *common, "--domain", str(domain_images), "--out", str(out)]) == 0
    assert "pre-trained on 4 concepts (8 images), 2 steps" in capsys.readouterr().out
    tensors, meta = read_safetensors(out / DOMAIN_FILE)
    assert meta["t2i_fast.kind"] == "e4t_domain" and json.loads(meta["t2i_fast.rank"]) == 1
    assert json.loads((out / REPORT).read_text())["steps"] == 2

    flat = tmp_path / "flat"  # each image its own concept; a caption is its prompt
    flat.mkdir()
    for k in range(3):
        (write_concept_images(tmp_path / f"src_{k}", n=1, size=64, seed=k) / "img_0.png").rename(flat / f"dog_{k}.png")
    (flat / "dog_0.txt").write_text("a drawing of a dog on grass\n")
    assert main(["pretrain-e4t", *common, "--domain", str(flat), "--out", str(tmp_path / "flat_out")]) == 0
    report = json.loads((tmp_path / "flat_out" / REPORT).read_text())
    assert report["concepts"] == 3 and report["images"] == 3


@pytest.mark.parametrize("args, needle", [
    ("single-concept", r"^error: --domain \S+ holds 1 concept\(s\); pre-training needs many concepts"),
    (["--steps", "0"], r"^error: --steps must be at least 1, got 0$"),
    (["--checkpoint-every", "-1"], r"^error: --checkpoint-every must be at least 0, got -1$"),
    (["--lr", "0"], r"^error: --lr must be positive, got 0.0$"),
    ("out-inside-domain", r"^error: --out \S+ lies inside --domain \S+; a later run would read it as a concept"),
], ids=["single-concept", "zero-steps", "negative-checkpoint-every", "zero-lr", "out-inside-domain"])
def test_cli_bad_input_is_one_line_with_exit_status_2(tiny_model, domain_images, tmp_path, capsys, args, needle):
    from t2i_fast.cli import main

    domain_dir = domain_images
    if args == "single-concept":
        domain_dir = _domain_images(tmp_path / "one", concepts=1)
        args = []
    out = tmp_path / "out"
    if args == "out-inside-domain":
        out, args = domain_dir / "domain_out", []
    code = main(["pretrain-e4t", "--model", str(tiny_model), "--domain", str(domain_dir), "--class-word", "dog",
                 "--out", str(out), "--steps", "2", "--no-progress", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert re.search(needle, errors[0]), errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- tuning
def test_tuning_saves_the_documented_file_and_says_it_uses_the_first_image(base_cfg, domain, concept_dir, capsys,
                                                                           one_thread):
    result = t2i_fast.train(_cfg(base_cfg, domain))
    err = capsys.readouterr().err
    assert f"e4t tunes on one image: using img_0.png, the first of the 2 in {concept_dir}" in err
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert FILE in result.files and (result.out / FILE).is_file()
    tensors, meta = read_safetensors(result.out / FILE)
    assert tensors["token_embedding"].shape == (1, 32)
    offsets = {k for k in tensors if k != "token_embedding"}
    assert offsets and all(k.endswith((".lora_A", ".lora_B")) for k in offsets)
    domain_tensors, _ = read_safetensors(domain / DOMAIN_FILE)
    assert offsets == {k for k in domain_tensors if not k.startswith("encoder.")}
    assert any(not torch.equal(tensors[k], domain_tensors[k]) for k in offsets)  # the offsets tuned
    assert meta["t2i_fast.kind"] == "e4t" and json.loads(meta["t2i_fast.config"])["method"] == "e4t"
    recorded = ("token", "domain_class_word", "offsets", "encoder", "rank")
    assert {k: json.loads(meta[f"t2i_fast.{k}"]) for k in recorded} \
        == {"token": "<sks>", "domain_class_word": "dog", "offsets": True, "encoder": True, "rank": 2}
    report = json.loads((result.out / "report.json").read_text())
    assert report["method"] == "e4t" and report["config"]["early_stop"] == "none"  # its default: no DVAR


def test_a_single_image_concept_is_tuned_without_the_first_image_notice(base_cfg, domain, tmp_path, capsys,
                                                                        one_thread):
    one = write_concept_images(tmp_path / "one", n=1, size=64)
    t2i_fast.train(_cfg(base_cfg, domain, images=str(one), max_steps=1))
    assert "e4t tunes on one image" not in capsys.readouterr().err


def test_tuning_starts_from_the_domain_on_the_first_image(base_cfg, domain, tiny_model, concept_dir, one_thread):
    """Before any step: v* = e_class + 0.1 · head_domain(features of img_0), not of img_1, and the UNet's offsets
    are the domain's."""
    from t2i_fast.data import ConceptImages
    from t2i_fast.models import load_components
    from t2i_fast.trainer import Trainer

    trainer = Trainer(_cfg(base_cfg, domain))  # loads and patches the models; writes nothing
    method = trainer.method
    tensors, _ = read_safetensors(domain / DOMAIN_FILE)
    comps = load_components(tiny_model)
    images = ConceptImages(concept_dir, 32, center_crop=True, random_flip=False)
    features, _ = image_features(comps, torch.stack([images.pixels(0, 0), images.pixels(1, 0)]))
    head = EncoderHead(features.shape[1], 32)
    head.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    e_class = class_embedding(comps.tokenizer, comps.text_encoder, "dog")
    with torch.no_grad():
        want = e_class + SCALE * head(features)
        got = method.vector()
    assert got.shape == (1, 32)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (got[0] - want[1]).abs().max() > 1e-6  # the second image would give another v*
    state = offset_state(method.layers)
    assert set(state) == {k for k in tensors if not k.startswith("encoder.")}
    for k, v in state.items():
        assert torch.equal(v.detach(), tensors[k]), k
    assert not trainer.out.exists()


def test_tuning_resumes_exactly_from_the_cli(tiny_model, concept_dir, domain, tmp_path, one_thread):
    from t2i_fast.cli import main

    common = ["train", "--method", "e4t", "--model", str(tiny_model), "--images", str(concept_dir), "--class-word",
              "dog", "--domain", str(domain), "--resolution", "32", "--num-samples", "0", "--no-progress", "--lr",
              "1e-2"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main([*common, "--max-steps", "2", "--out", str(resumed)]) == 0
    assert main([*common, "--max-steps", "4", "--out", str(resumed), "--resume"]) == 0
    assert main([*common, "--max-steps", "4", "--out", str(straight)]) == 0
    assert json.loads((resumed / "report.json").read_text())["steps"] == 4
    a, b = read_safetensors(resumed / FILE)[0], read_safetensors(straight / FILE)[0]
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------- sampling
def test_sampling_adds_the_token_and_folds_the_offsets(tuned, tiny_model, base_pipe):
    from t2i_fast.sampling import build_pipeline, load_adapter

    tensors, _ = read_safetensors(tuned.out / FILE)
    pipe = build_pipeline(tiny_model, adapter=tuned.out, progress=False)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(),
                               tensors["token_embedding"][0])
    assert not any(isinstance(m, OffsetLinear) for m in pipe.unet.modules())  # folded: a plain diffusers UNet
    layer = sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_A"))[0]
    base_w = attention_projections(base_pipe.unet)[layer].weight.detach()
    torch.testing.assert_close(attention_projections(pipe.unet)[layer].weight.detach(),
                               base_w * (1 + tensors[f"{layer}.lora_B"] @ tensors[f"{layer}.lora_A"]))
    with_token = _image(pipe, PROMPT)
    assert np.abs(with_token - _image(base_pipe, PROMPT)).max() > 1e-3

    with pytest.raises(UserError, match=r"this pipeline knows <sks> already .*load each into a fresh pipeline"):
        load_adapter(pipe, tuned.out)
    np.testing.assert_allclose(_image(pipe, PROMPT), with_token, atol=1e-6)  # nothing was folded twice


def test_the_toy_evaluator_loads_it_through_the_methods_loader(tuned, tiny_model):
    from t2i_fast.sampling import build_pipeline
    from t2i_fast.toy.evaluator import load_adapter

    pipe = build_pipeline(tiny_model, progress=False)
    assert load_adapter(pipe, tuned.out) == [FILE]
    assert "<sks>" in pipe.tokenizer.get_vocab()


def test_the_memory_plan_and_vram_trace_e4t_on_the_meta_device(base_cfg, domain, one_thread, capsys):
    """`t2i-fast plan` and --vram build the run on the meta device (read_domain skips its fingerprint check
    there for that reason): E4T's set-up, image features included, must trace there like every method."""
    from t2i_fast.memplan import estimate

    plan = estimate(_cfg(base_cfg, domain), target="cpu")
    tensors, _ = read_safetensors(domain / DOMAIN_FILE)  # the encoder head and the offsets: what tunes
    assert plan.get("trained tensors") == 4 * sum(t.numel() for t in tensors.values())
    capsys.readouterr()
    result = t2i_fast.train(_cfg(base_cfg, domain, vram="8GB"))
    assert FILE in result.files and result.steps == 3
    assert capsys.readouterr().err.count("e4t tunes on one image") == 1  # the run's, not the planner's pass too


# ------------------------------------------------------------------------------------------------ bad input
def test_e4t_without_a_domain_is_refused_before_the_output_folder_is_made(base_cfg, tmp_path):
    with pytest.raises(UserError, match=r"--method e4t needs --domain D.*t2i-fast pretrain-e4t") as e:
        t2i_fast.train(base_cfg.replace(method="e4t"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_domain_made_for_another_model_is_refused_naming_both(base_cfg, domain, tiny_model, tmp_path, one_thread):
    other = save_pipeline("tiny", tmp_path / "other_model", seed=1)
    with pytest.raises(UserError, match="was pre-trained for the model") as e:
        t2i_fast.train(_cfg(base_cfg, domain, model=str(other)))
    message = str(e.value)
    assert f"for the model {tiny_model}, not for {other}" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, needle", [
    (dict(num_vectors=2), "--num-vectors is not supported by e4t (the encoder makes one vector)"),
    (dict(train_text_encoder=True), "--train-text-encoder is not supported by e4t"),
    ("no-file", "no e4t_domain.safetensors there; make one with `t2i-fast pretrain-e4t"),
    ("other-kind", "is not an e4t_domain file (kind 'e4t'); make one with `t2i-fast pretrain-e4t`"),
    (dict(template="a photo of a {cls}"), "has no {token}: the encoder's word would never be seen"),
], ids=["num-vectors", "train-text-encoder", "folder-without-domain-file", "file-of-another-kind",
        "template-without-token"])
def test_bad_input_is_one_line_before_anything_is_written(base_cfg, domain, tuned, tmp_path, change, needle,
                                                          one_thread):
    kw = {}
    if change == "no-file":
        (tmp_path / "empty").mkdir()
        kw["domain"] = tmp_path / "empty"
    elif change == "other-kind":
        kw["domain"] = tuned.out / FILE  # a tuned concept, not a domain
    else:
        kw = dict(change)
    cfg = _cfg(base_cfg, kw.pop("domain", domain), **kw)
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        t2i_fast.train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ ablations
class NoOffsets(E4T):
    offsets = False


class NoEncoder(E4T):
    encoder = False


def test_without_offsets_it_saves_only_the_token_and_samples_with_the_base_unet(base_cfg, domain, tiny_model,
                                                                                base_pipe, monkeypatch, one_thread):
    from t2i_fast.sampling import build_pipeline

    monkeypatch.setattr(e4t_module, "E4T", NoOffsets)  # what the registry's "e4t" resolves to
    result = t2i_fast.train(_cfg(base_cfg, domain))
    monkeypatch.undo()  # sampling reads the file, not the class
    tensors, meta = read_safetensors(result.out / FILE)
    assert set(tensors) == {"token_embedding"} and torch.isfinite(tensors["token_embedding"]).all()
    assert json.loads(meta["t2i_fast.offsets"]) is False and json.loads(meta["t2i_fast.encoder"]) is True
    assert result.steps == 3 and all(np.isfinite(result.losses))

    pipe = build_pipeline(tiny_model, adapter=result.out, progress=False)
    for name, layer in attention_projections(pipe.unet).items():  # no offset folded in
        assert torch.equal(layer.weight, attention_projections(base_pipe.unet)[name].weight), name
    np.testing.assert_allclose(_image(pipe, OTHER), _image(base_pipe, OTHER), atol=1e-6)
    assert np.abs(_image(pipe, PROMPT) - _image(base_pipe, PROMPT)).max() > 1e-3  # the token still acts


def test_without_the_encoder_it_tunes_a_free_vector_from_the_class_word(base_cfg, domain, tiny_model, monkeypatch,
                                                                        one_thread):
    from t2i_fast.models import load_components

    monkeypatch.setattr(e4t_module, "E4T", NoEncoder)
    result = t2i_fast.train(_cfg(base_cfg, domain))
    tensors, meta = read_safetensors(result.out / FILE)
    vector = tensors["token_embedding"]
    assert vector.shape == (1, 32) and torch.isfinite(vector).all()
    assert any(k.endswith(".lora_A") for k in tensors) and any(k.endswith(".lora_B") for k in tensors)
    assert json.loads(meta["t2i_fast.encoder"]) is False and json.loads(meta["t2i_fast.offsets"]) is True
    comps = load_components(tiny_model)
    e_class = class_embedding(comps.tokenizer, comps.text_encoder, "dog")
    moved = (vector[0] - e_class).abs().max()
    assert 0 < moved < 1  # it started at the class word and trained (3 Adam steps of 1e-2)
