"""Custom Diffusion on the tiny model: what trains, the files and how diffusers (and we) load them, every
modifier token of a multi-concept run training, the rescale augmentation, and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from t2i_fast import TrainConfig
from t2i_fast.errors import UserError
from t2i_fast.cd_files import CD_FILE, CD_SVD_FILE, cross_attention_modules, load_compressed, svd_compress
from t2i_fast.trainer import Trainer

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
FAST = dict(resolution=32, num_samples=0, progress=False, early_stop="none", method="custom_diffusion")


def _class_dir(root, n=2, caption="a photo of a dog"):
    from t2i_fast.testing import write_concept_images

    folder = write_concept_images(root, n=n, size=64, seed=7)
    for p in folder.glob("*.png"):
        p.with_suffix(".txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def cd_run(tiny_model, concept_dir, tmp_path_factory):
    """One 3-step run with class images, fused attention (kernels on) and the SVD-compressed file."""
    root = tmp_path_factory.mktemp("cd")
    cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", token="<new1>",
                      class_images=str(_class_dir(root / "class")), out=str(root / "run"), max_steps=3, lr=1e-2,
                      compress_svd=0.6, crop_variants=2, **{**FAST, "num_samples": 1}, sample_steps=2)
    trainer = Trainer(cfg)
    base = {k: (a.to_k.weight.detach().clone(), a.to_v.weight.detach().clone())
            for k, a in cross_attention_modules(trainer.comps.unet).items()}
    trainer.run()
    trainer.comps.unet.to("cpu").eval()
    trainer.comps.text_encoder.to("cpu")
    return trainer, base


def _pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), h).sample


def _image(pipe, prompt):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images[0]


def _cd_procs(unet):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0

    return {k for k, p in unet.attn_processors.items()
            if isinstance(p, (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0))}


def test_trains_only_cross_attention_kv_and_the_token(cd_run):
    from safetensors import safe_open

    trainer, base = cd_run
    assert trainer.prior is not None and trainer.streams[0].masked and trainer.streams[0].prefix
    assert type(next(iter(trainer.method.processors.values()))).__name__ == "FastCustomDiffusionAttnProcessor"
    with safe_open(str(trainer.out / CD_FILE), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        trained = {k: f.get_tensor(k) for k in keys if not k.endswith(".processor")}
        assert all(f.get_tensor(k).numel() == 0 for k in keys if k.endswith(".processor"))  # attn1 placeholders
    assert KEY in keys and all(".attn2.processor." in k for k in trained)
    assert {k.rsplit(".", 2)[-2] for k in trained} == {"to_k_custom_diffusion", "to_v_custom_diffusion"}
    assert json.loads(meta["t2i_fast.tokens"]) == ["<new1>"]
    for key, (k0, v0) in base.items():
        attn = cross_attention_modules(trainer.comps.unet)[key]
        assert torch.equal(attn.to_k.weight, k0) and torch.equal(attn.to_v.weight, v0)  # the base is frozen
        assert not torch.allclose(trained[f"{key}.to_k_custom_diffusion.weight"], k0)  # the copy trained
    emb = trainer.comps.text_encoder.get_input_embeddings()
    assert emb.new.shape == (1, 32) and (trainer.out / "<new1>.safetensors").is_file()
    assert (trainer.out / "samples.png").is_file()  # the grid went through sampling.load_adapter


def test_diffusers_loads_it_only_with_the_pipeline(cd_run, tiny_model):
    trainer, _ = cd_run
    pipe = _pipe(tiny_model)
    base_image = _image(pipe, "a photo of <new1> dog")
    # the peer bug: without _pipeline diffusers builds the processors and silently drops them
    pipe.unet.load_attn_procs(trainer.out, weight_name=CD_FILE)
    assert not _cd_procs(pipe.unet)
    # with _pipeline it installs them (our file carries the empty attn1 entries it needs for that)
    pipe.unet.load_attn_procs(trainer.out, weight_name=CD_FILE, _pipeline=pipe)
    procs = pipe.unet.attn_processors  # attn1 get untrained (train_kv=False) Custom Diffusion processors
    assert _cd_procs(pipe.unet) == set(procs)
    assert {k for k, p in procs.items() if p.train_kv} == set(cross_attention_modules(pipe.unet))
    pipe.load_textual_inversion(str(trainer.out / "<new1>.safetensors"), token="<new1>")
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(trainer.comps.unet), rtol=1e-5, atol=1e-5)
    assert np.abs(_image(pipe, "a photo of <new1> dog") - base_image).max() > 1e-4


def test_load_adapter_installs_and_checks(cd_run, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from t2i_fast.sampling import load_adapter

    trainer, _ = cd_run
    pipe = _pipe(tiny_model)
    assert load_adapter(pipe, trainer.out) == [CD_FILE, "<new1>.safetensors"]  # the full file wins
    assert _cd_procs(pipe.unet) == set(cross_attention_modules(pipe.unet))
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(trainer.comps.unet), rtol=1e-5, atol=1e-5)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<new1>"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids],
                               trainer.method.embedding.new.detach())
    # a file that does not fit the model fails loudly, never keeps the default processors
    state = load_file(trainer.out / CD_FILE)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({**state, KEY: torch.zeros(5, 7)}, str(bad / CD_FILE))
    with pytest.raises(UserError, match="shape"):
        load_adapter(_pipe(tiny_model), bad)
    save_file({"mid_block.nope.attn2.processor.to_k_custom_diffusion.weight": torch.zeros(2, 2)}, str(bad / CD_FILE))
    with pytest.raises(UserError, match="does not exist in this UNet"):
        load_adapter(_pipe(tiny_model), bad)


def test_svd_compressed_deltas(cd_run, tiny_model, tmp_path):
    from safetensors.torch import load_file

    from t2i_fast.sampling import load_adapter

    delta = torch.randn(20, 12) @ torch.randn(12, 12)
    u, v = svd_compress(delta, 0.6)
    s = torch.linalg.svdvals(delta.double())
    r = u.shape[1]
    assert s[:r].sum() / s.sum() >= 0.6 > s[:r - 1].sum() / s.sum()
    torch.testing.assert_close(u @ v, (torch.linalg.svd(delta.double())[0][:, :r] * s[:r]
                                       @ torch.linalg.svd(delta.double())[2][:r]).float(), rtol=1e-4, atol=1e-4)
    trainer, base = cd_run
    full = load_file(trainer.out / CD_FILE)
    svd_only = tmp_path / "svd"
    svd_only.mkdir()
    shutil.copy(trainer.out / CD_SVD_FILE, svd_only)
    pipe = _pipe(tiny_model)
    weights = load_compressed(svd_only / CD_SVD_FILE, pipe.unet)
    assert weights.keys() == {k for k, t in full.items() if t.numel()}
    assert load_adapter(pipe, svd_only) == [CD_SVD_FILE]
    proc = pipe.unet.attn_processors[KEY.rsplit(".", 2)[0]]
    torch.testing.assert_close(proc.to_k_custom_diffusion.weight, weights[KEY])
    k0 = base[KEY.rsplit(".", 2)[0]][0]
    # the compressed delta is the best rank-r approximation: closer to the trained delta than nothing
    assert (weights[KEY] - full[KEY]).norm() < (k0 - full[KEY]).norm()


def test_multi_concept_trains_every_token(tiny_model, concept_dir, tmp_path, monkeypatch):
    from t2i_fast.testing import write_concept_images

    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path / "cache"))
    cat = write_concept_images(tmp_path / "cat", n=2, size=64, seed=3)
    toy = write_concept_images(tmp_path / "toy", n=2, size=64, seed=5)
    concepts = [{"images": str(concept_dir), "class_word": "dog", "class_images": str(_class_dir(tmp_path / "cls"))},
                {"images": "cat", "class_word": "cat", "class_prompt": "a photo of a cat"},
                {"images": str(toy), "class_word": "toy"}]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    cfg = TrainConfig(model=str(tiny_model), concepts=str(tmp_path / "concepts.json"), out=str(tmp_path / "run"),
                      max_steps=3, batch_size=3, lr=5e-2, weight_decay=0.0, num_class_images=1, kernels=False,
                      crop_variants=1,
                      freeze_model="crossattn", **FAST)
    assert cat.is_dir()
    trainer = Trainer(cfg)
    emb = trainer.method.embedding
    assert list(emb.token_rows) == ["<new1>", "<new2>", "<new3>"] and emb.new.shape[0] == 3
    assert type(next(iter(trainer.method.processors.values()))).__name__ == "CustomDiffusionAttnProcessor2_0"
    init = emb.new.detach().clone()
    grads = []
    emb.new.register_hook(lambda g: grads.append(g.detach().abs().sum(1) > 0))
    result = trainer.run()
    assert torch.stack(grads).any(0).all(), "a modifier token never received a gradient"
    for token, rows in emb.token_rows.items():  # the peer bug leaves the last one untrained
        assert not torch.equal(emb.new[rows], init[rows]), f"{token} did not move"
    for n in (1, 2, 3):
        assert (result.out / f"<new{n}>.safetensors").is_file()
    # --freeze-model crossattn also trains to_q and to_out
    from safetensors import safe_open

    with safe_open(str(result.out / CD_FILE), "pt") as f:
        kinds = {k.rsplit(".processor.", 1)[1] for k in f.keys() if ".processor." in k}
    assert "to_q_custom_diffusion.weight" in kinds and "to_out_custom_diffusion.0.weight" in kinds
    assert (tmp_path / "cache" / "class_images").is_dir()  # class images generated from the prompt, cached


def test_fast_processor_matches_diffusers():
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

    from t2i_fast.methods.custom_diffusion import make_processor

    torch.manual_seed(0)
    attn = Attention(40, cross_attention_dim=24, heads=2, dim_head=20)
    x, ctx = torch.randn(2, 9, 40), torch.randn(2, 7, 24, requires_grad=True)
    outs = []
    for fast in (False, True):
        proc = make_processor(attn, train_q_out=True, fast=fast)
        assert isinstance(proc, CustomDiffusionAttnProcessor2_0) != fast
        attn.set_processor(proc)
        ctx.grad = None
        out = attn(x, ctx)
        out.square().sum().backward()
        assert ctx.grad[:, 0].abs().max() == 0  # K/V of the start token are detached
        outs.append((out.detach(), ctx.grad.clone(), proc.to_k_custom_diffusion.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rescale_augmentation_as_the_paper(concept_dir):
    from t2i_fast.data import ConceptImages, draw_rescale

    rng = np.random.default_rng(0)
    scales = np.array([draw_rescale(rng) for _ in range(2000)])
    assert (((scales >= 1 / 3) & (scales <= 1)) | ((scales >= 1.2) & (scales <= 1.4))).all()
    assert 0.6 < (scales <= 1).mean() < 0.72
    images = ConceptImages(concept_dir, 32, rescale_variants=16, seed=1)
    for v in range(images.num_variants):
        var = images.variant(0, v)
        assert var.prefix in ("", "a far away ", "very small ", "zoomed in ", "close up ")
        assert (var.prefix in ("zoomed in ", "close up ")) == (var.scale > 1)
        assert (var.prefix in ("a far away ", "very small ")) == (var.scale < 0.6)
        mask = images.mask(0, v, 4)
        if var.scale >= 1:
            assert mask.all()
        else:  # masked cells are blank canvas in the pixels
            px = images.pixels(0, v)
            cells = px.reshape(3, 4, 8, 4, 8).permute(1, 3, 0, 2, 4).reshape(4, 4, -1)
            blank = (cells.abs() < 0.01).all(-1)
            assert not (blank & mask[0].bool()).any()


@pytest.mark.parametrize("case", ["bad_json", "missing_folder", "token_in_vocab"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model, concept_dir, tmp_path, capsys):
    from t2i_fast.cli import main

    concepts = tmp_path / "concepts.json"
    args = ["train", "--model", str(tiny_model), "--method", "custom_diffusion", "--resolution", "32",
            "--out", str(tmp_path / "run"), "--num-samples", "0", "--no-progress"]
    if case == "bad_json":
        concepts.write_text("[{'images': 'x'")
        args += ["--concepts", str(concepts)]
    elif case == "missing_folder":
        concepts.write_text(json.dumps([{"images": str(tmp_path / "nope"), "class_word": "dog"}]))
        args += ["--concepts", str(concepts)]
    else:
        args += ["--images", str(concept_dir), "--token", "a"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("error:")
    assert {"bad_json": "concepts.json", "missing_folder": "nope", "token_in_vocab": "vocabulary"}[case] in err[0]
    assert not (tmp_path / "run").exists()


def test_token_without_brackets_loads(tiny_model, concept_dir, tmp_path):
    """The token files are found from the weights file's token list, however the token is spelled."""
    from t2i_fast import train
    from t2i_fast.sampling import load_adapter

    out = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", token="qzxv",
                      out=str(out), max_steps=1, lr=1e-2, **FAST))
    assert (out / "qzxv.safetensors").is_file()
    for load in (load_adapter, lambda pipe, run: load_adapter(pipe, run / CD_FILE)):  # the file alone brings its token
        pipe = _pipe(tiny_model)
        load(pipe, out)
        assert "qzxv" in pipe.tokenizer.get_vocab()


def test_no_random_flip_holds_for_rescale_variants(concept_dir):
    """--no-random-flip: no variant is mirrored, the rescales' prompt wording still varies, and turning flips
    off changes nothing else about the variants."""
    from dataclasses import replace

    from t2i_fast.data import ConceptImages

    flipping = ConceptImages(concept_dir, 32, random_flip=True, rescale_variants=16, seed=1)
    straight = ConceptImages(concept_dir, 32, random_flip=False, rescale_variants=16, seed=1)
    rescales = [v for v in straight.variants[0] if v.scale != 1.0]
    assert not any(v.flip for v in straight.variants[0])
    assert {v.wording for v in rescales} == {0, 1}
    assert [replace(v, flip=False) for v in flipping.variants[0] if v.scale != 1.0] == rescales


def test_concepts_file_paths(concept_dir, tmp_path, monkeypatch):
    """Image folders in a concepts file: relative to the file, absolute, or from the home folder (~)."""
    from t2i_fast.concepts import load_concepts

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copytree(concept_dir, tmp_path / "home" / "dog")
    shutil.copytree(concept_dir, tmp_path / "files" / "cat")
    spec = tmp_path / "files" / "concepts.json"
    spec.write_text(json.dumps([{"images": "~/dog", "token": "<a>"}, {"images": "cat", "token": "<b>"},
                                {"images": str(concept_dir), "token": "<c>"}]))
    found = [c.images for c in load_concepts(TrainConfig(concepts=str(spec)))]
    assert found == [str(tmp_path / "home" / "dog"), str(tmp_path / "files" / "cat"), str(concept_dir)]


def test_modifier_token_starts_from_a_word_of_its_own(tiny_model, concept_dir, tmp_path):
    """Runs trained apart start their different tokens from different embeddings (by the token's index in the
    run they all started from "ktn", and two same-class concepts could end too alike to merge); a token starts
    from the same embedding in every run, the mean embedding of its rare word."""
    from t2i_fast.methods.custom_diffusion import rare_initializer

    def initial(token):
        cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", token=token,
                          out=str(tmp_path / token), max_steps=1, **FAST)
        trainer = Trainer(cfg)
        vocab_rows = trainer.comps.tokenizer(rare_initializer(token), add_special_tokens=False).input_ids
        word = trainer.method.embedding.base.weight[vocab_rows].mean(0)
        return trainer.method.embedding.new.detach().clone()[0], word

    cat, cat_word = initial("<cat1>")
    dog, _ = initial("<dog1>")
    again, _ = initial("<cat1>")
    assert rare_initializer("<cat1>") != rare_initializer("<dog1>")
    assert not torch.allclose(cat, dog)
    torch.testing.assert_close(cat, again, rtol=0, atol=0)
    torch.testing.assert_close(cat, cat_word)
