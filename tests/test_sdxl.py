"""SDXL: the tiny SDXL model is a real diffusers SDXL folder; its text features and time ids are what diffusers
computes; LoRA trains on it and loads through StableDiffusionXLPipeline's own loaders (our file and the kohya
export); sampling works; what cannot use SDXL yet is refused in one line before anything is written."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i_fast import TrainConfig, train
from t2i_fast.cli import main
from t2i_fast.errors import UserError
from t2i_fast.formats import LORA_FILE
from t2i_fast.models import detect_family, load_components


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from t2i_fast.testing import save_pipeline

    return save_pipeline("sdxl-tiny", tmp_path_factory.mktemp("models") / "sdxl-tiny")


@pytest.fixture
def sdxl_cfg(sdxl_model, concept_dir, tmp_path):
    return TrainConfig(model=str(sdxl_model), images=str(concept_dir), class_word="dog", out=str(tmp_path / "run"),
                       resolution=32, max_steps=3, num_samples=0, progress=False, lora_rank=4,
                       early_stop="none")


@pytest.fixture(scope="module")
def sdxl_lora_run(sdxl_model, concept_dir, tmp_path_factory):
    """A LoRA run on the UNet and both text encoders (alpha != rank, so the folded scale is exercised)."""
    cfg = TrainConfig(model=str(sdxl_model), images=str(concept_dir), class_word="dog", resolution=32,
                      max_steps=4, lr=1e-2, num_samples=0, progress=False, lora_rank=4, lora_alpha=8,
                      train_text_encoder=True, early_stop="none", out=str(tmp_path_factory.mktemp("sdxl") / "run"))
    return train(cfg).out


def _pipe(model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)


def _image(pipe, prompt="a photo of <sks> dog", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images[0]


def test_tiny_sdxl_is_a_real_sdxl_folder(sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = _pipe(sdxl_model)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    heads = {m.heads: m.inner_dim // m.heads for n, m in pipe.unet.named_modules() if n.endswith("attn1")}
    assert set(heads.values()) == {64}  # SDXL's real attention head dim
    assert pipe.tokenizer_2.pad_token == "!"  # as SDXL's second tokenizer

    comps = load_components(sdxl_model)
    assert comps.family == "sdxl" and detect_family(dict(cfg)) == "sdxl"
    assert comps.text_encoder_2 is not None and comps.tokenizer_2 is not None
    assert not any(p.requires_grad for m in comps.text_encoders for p in m.parameters())
    assert type(comps.pipeline()).__name__ == "StableDiffusionXLPipeline"


def test_mid_sdxl_has_the_real_conditioning_widths():
    from t2i_fast.testing import _sdxl_configs

    _, text_2, unet, _ = _sdxl_configs("sdxl-mid", 514)
    assert unet["cross_attention_dim"] == 2048 and unet["projection_class_embeddings_input_dim"] == 2816
    assert unet["transformer_layers_per_block"] == (1, 2, 4) and text_2["projection_dim"] == 1280


def test_text_features_are_diffusers_encode_prompt(sdxl_model):
    from t2i_fast.sdxl import SDXLTextCache

    pipe = _pipe(sdxl_model)
    prompts = ["a photo of a dog", "a rendering of a cat on a mat"]
    cache = SDXLTextCache(prompts, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            torch.testing.assert_close(cache.features[i:i + 1], embeds, rtol=0, atol=0)
            torch.testing.assert_close(cache.pooled[i:i + 1], pooled, rtol=0, atol=0)
    assert cache.features.shape == (2, 77, 32 + 48) and cache.pooled.shape == (2, 40)


def test_time_ids_follow_diffusers_crop_arithmetic(tmp_path):
    from PIL import Image

    from t2i_fast.data import ConceptImages
    from t2i_fast.sdxl import time_ids

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (100, 60)).save(folder / "a_landscape.png")  # w x h
    Image.new("RGB", (50, 90)).save(folder / "b_portrait.png")
    images = ConceptImages(folder, 32, center_crop=True)
    # landscape: resized to 32 x int(32 * 100 / 60) = 53 wide; left = round(21 / 2) = 10 (round half to even)
    assert time_ids(images, 0, 0).tolist() == [60, 100, 0, 10, 32, 32]
    assert time_ids(images, 0, 1).tolist() == [60, 100, 0, 10, 32, 32]  # a flip keeps the crop, as diffusers
    # portrait: int(32 * 90 / 50) = 57 high; top = round(25 / 2) = 12
    assert time_ids(images, 1, 0).tolist() == [90, 50, 12, 0, 32, 32]
    # random crops: the box (left, top, size) in source pixels, scaled to the resized frame
    crops = ConceptImages(folder, 32, center_crop=False, crop_variants=2, random_flip=False)
    v = crops.variant(0, 1)
    expected = [60, 100, round(v.top * 32 / v.size), round(v.left * 32 / v.size), 32, 32]
    assert time_ids(crops, 0, 1).tolist() == expected


def test_cached_and_uncached_text_give_the_same_first_loss(sdxl_cfg, tmp_path):
    on = train(sdxl_cfg.replace(max_steps=1, out=str(tmp_path / "on")))
    off = train(sdxl_cfg.replace(max_steps=1, out=str(tmp_path / "off"), cache_latents=False, cache_text=False))
    assert on.losses[0] == pytest.approx(off.losses[0], rel=1e-5, abs=1e-6)


def test_lora_loss_falls_on_sdxl(sdxl_cfg):
    from t2i_fast.trainer import Trainer

    trainer = Trainer(sdxl_cfg.replace(lr=1e-2, max_steps=25))
    batch = trainer._build_batches().draw(torch.Generator().manual_seed(123), 8)
    assert batch.time_ids.shape == (8, 6) and batch.pooled.shape == (8, 40)
    with torch.no_grad():
        before = trainer.loss(batch).item()
    trainer.run()
    with torch.no_grad():
        after = trainer.loss(batch).item()
    assert after < before * 0.9, (before, after)


def test_lora_file_loads_in_sdxl_pipeline_and_changes_output(sdxl_lora_run, sdxl_model):
    keys = load_file(sdxl_lora_run / LORA_FILE)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = _pipe(sdxl_model)
    base = _image(pipe)
    pipe.load_lora_weights(sdxl_lora_run, weight_name=LORA_FILE)
    assert any("lora" in n for n, _ in pipe.text_encoder_2.named_modules())  # text_encoder_2. keys were read
    with_lora = _image(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.unload_lora_weights()
    np.testing.assert_allclose(_image(pipe), base, atol=1e-6)


def test_lora_file_reproduces_our_trained_modules(sdxl_cfg, sdxl_model):
    """diffusers' loader rebuilds exactly the UNet and both text encoders we trained (alpha folded into B)."""
    from t2i_fast.sdxl import encode_prompt, tokenize_pair
    from t2i_fast.trainer import Trainer

    trainer = Trainer(sdxl_cfg.replace(lr=1e-2, max_steps=2, lora_alpha=8, train_text_encoder=True))
    trainer.run()
    comps = trainer.comps
    pipe = _pipe(sdxl_model)
    pipe.load_lora_weights(trainer.out, weight_name=LORA_FILE)
    ids = tokenize_pair((pipe.tokenizer, pipe.tokenizer_2), ["a photo of a dog"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        ours_h, ours_p = encode_prompt([m.to("cpu") for m in comps.text_encoders], ids)
        theirs_h, theirs_p = encode_prompt((pipe.text_encoder, pipe.text_encoder_2), ids)
        added = {"text_embeds": ours_p, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        ours = comps.unet.to("cpu")(x, t, ours_h, added_cond_kwargs=added).sample
        theirs = pipe.unet(x, t, ours_h, added_cond_kwargs=added).sample
    torch.testing.assert_close(ours_h, theirs_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_p, theirs_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kohya_export_names_both_text_encoders_and_loads_like_our_file(sdxl_lora_run, sdxl_model):
    from t2i_fast.export import export

    path = export(sdxl_lora_run, "kohya", out=sdxl_lora_run / "kohya")
    kohya, ours = load_file(path), load_file(sdxl_lora_run / LORA_FILE)
    assert len(kohya) == len(ours) // 2 * 3
    prefixes = {k.split("_text_model")[0] for k in kohya if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    # the UNet by the original SDXL checkpoint's block names, as kohya's sd-scripts write SDXL LoRAs
    unet_blocks = {re.match(r"lora_unet_([a-z]+_blocks?)_", k)[1] for k in kohya if k.startswith("lora_unet_")}
    assert unet_blocks == {"input_blocks", "middle_block", "output_blocks"}
    te2 = "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"
    ours_te2 = {k.replace("text_encoder_2.text_model.", "text_encoder_2."): v for k, v in ours.items()}
    torch.testing.assert_close(kohya[f"{te2}.lora_up.weight"],
                               ours_te2["text_encoder_2.encoder.layers.1.self_attn.v_proj.lora_B.weight"])

    with_ours = _pipe(sdxl_model)
    with_ours.load_lora_weights(sdxl_lora_run, weight_name=LORA_FILE)
    with_kohya = _pipe(sdxl_model)
    with_kohya.load_lora_weights(path.parent, weight_name=path.name)
    assert any("lora" in n for n, _ in with_kohya.text_encoder.named_modules())  # lora_te1_ read
    assert any("lora" in n for n, _ in with_kohya.text_encoder_2.named_modules())  # lora_te2_ read
    np.testing.assert_allclose(_image(with_kohya), _image(with_ours), atol=1e-5)


def test_sgm_names_are_the_sdxl_checkpoint_blocks():
    """SDXL base (2 layers per block): its second down block's first attention is input_blocks.4, the middle
    one middle_block.1, the first up block's first output_blocks.0, its second up block's last
    output_blocks.5 (the key names of kohya SDXL LoRAs, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_...)."""
    from t2i_fast.export import sgm_unet_path

    cases = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
             "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k": "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
             "mid_block.attentions.0.transformer_blocks.3.attn2.to_v": "middle_block.1.transformer_blocks.3.attn2.to_v",
             "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0",
             "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_q": "output_blocks.5.1.transformer_blocks.1.attn2.to_q"}
    assert {k: sgm_unet_path(k, 2) for k in cases} == cases
    with pytest.raises(UserError, match="not in an attention block"):
        sgm_unet_path("down_blocks.0.resnets.0.conv1", 2)


def test_sample_cli_and_build_pipeline_with_an_sdxl_run(sdxl_lora_run, sdxl_model, tmp_path):
    from t2i_fast.sampling import build_pipeline

    out = tmp_path / "imgs"
    code = main(["sample", "--model", str(sdxl_model), "--adapter", str(sdxl_lora_run), "--prompt",
                 "a photo of <sks> dog", "--n", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_seed0.png", "001_seed1.png", "grid.png"]
    pipe = build_pipeline(sdxl_model, sdxl_lora_run, progress=False)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert any("lora" in n for n, _ in pipe.text_encoder_2.named_modules())


@pytest.mark.parametrize("method", ["selfattn_copy", "e4t"])
def test_methods_without_sdxl_are_refused_in_one_line(sdxl_model, concept_dir, tmp_path, capsys, method):
    out = tmp_path / "run"
    code = main(["train", "--model", str(sdxl_model), "--images", str(concept_dir), "--method", method,
                 "--class-word", "dog", "--out", str(out), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"--method {method}" in err[0]
    assert "SDXL model" in err[0] and "SD 1.x or SD 2.x" in err[0], err[0]
    assert "or train this model with --method lora or textual_inversion or custom_diffusion or dreambooth or " \
           "two_stage" in err[0], err[0]
    assert not out.exists()


def test_init_embeddings_of_the_other_family_are_refused_in_one_line(sdxl_cfg, tiny_model, concept_dir, tmp_path):
    from t2i_fast.formats import save_textual_inversion, save_textual_inversion_sdxl

    sd1_file, sdxl_file = tmp_path / "sd1.safetensors", tmp_path / "sdxl.safetensors"
    save_textual_inversion(sd1_file, "<tok>", torch.zeros(1, 32))
    save_textual_inversion_sdxl(sdxl_file, "<tok>", torch.zeros(1, 32), torch.zeros(1, 48))
    with pytest.raises(UserError, match="is an SD 1.x/2.x embedding but the model is SDXL"):
        train(sdxl_cfg.replace(init_embeddings=str(sd1_file)))
    with pytest.raises(UserError, match=r"is an SDXL \(clip_l, clip_g\) embedding but the model is SD 1.x/2.x"):
        train(sdxl_cfg.replace(model=str(tiny_model), init_embeddings=str(sdxl_file)))
    assert not (tmp_path / "run").exists()


def test_two_stage_on_sdxl_loads_through_diffusers(sdxl_cfg, sdxl_model):
    """Stage 1 learns the token in both encoders; stage 2's LoRA trains with those rows frozen in both; the
    combined run loads in diffusers (each encoder's load_textual_inversion, then load_lora_weights) and
    through our loader, with the token's rows exactly stage 1's."""
    from t2i_fast.formats import LORA_FILE, TI_FILE
    from t2i_fast.sampling import build_pipeline

    result = train(sdxl_cfg.replace(method="two_stage", stage1_steps=2, stage1_lr=5e-2, stage2_steps=2,
                                    stage2_lr=1e-2))
    out = result.out
    assert {TI_FILE, LORA_FILE} <= {p.name for p in out.iterdir()}
    state = load_file(out / TI_FILE)
    stage2_lora = load_file(out / "stage2" / LORA_FILE)
    assert any(k.startswith("unet.") for k in stage2_lora) and not any("text_encoder" in k for k in stage2_lora)

    pipe = _pipe(sdxl_model)
    base = _image(pipe)
    pipe.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    ours = build_pipeline(sdxl_model, out, progress=False)
    for loaded in (pipe, ours):
        for te, tok, key in ((loaded.text_encoder, loaded.tokenizer, "clip_l"),
                             (loaded.text_encoder_2, loaded.tokenizer_2, "clip_g")):
            row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<sks>")]
            torch.testing.assert_close(row[None], state[key])
    assert np.abs(_image(pipe) - base).max() > 1e-4
    pipe.scheduler = ours.scheduler  # ours samples with DPM-Solver
    np.testing.assert_allclose(_image(ours), _image(pipe), atol=1e-5)


def test_custom_diffusion_on_sdxl_loads_with_diffusers_own_loaders(sdxl_cfg, sdxl_model):
    """K/V of every SDXL cross-attention layer (on the two encoders' joined features: 2048 wide on SDXL,
    80 on the tiny one) and the modifier token in both
    encoders train; diffusers' load_attn_procs (with _pipeline) and each encoder's load_textual_inversion give
    the trained UNet's output and change the image; our loader gives the same image."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    from t2i_fast.cd_files import CD_FILE, cross_attention_modules
    from t2i_fast.sampling import build_pipeline
    from t2i_fast.trainer import Trainer

    trainer = Trainer(sdxl_cfg.replace(method="custom_diffusion", lr=1e-3, max_steps=3))
    starts = [e.new.detach().clone() for e in trainer.method.embeddings]
    trainer.run()
    assert len(starts) == 2 and all(not torch.equal(e.new, s) for e, s in zip(trainer.method.embeddings, starts))
    token = load_file(trainer.out / "<sks>.safetensors")
    assert {k: tuple(v.shape) for k, v in token.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}

    pipe = _pipe(sdxl_model)
    base = _image(pipe, "a photo of <sks> dog")
    pipe.unet.load_attn_procs(trainer.out, weight_name=CD_FILE, _pipeline=pipe)
    trained = {k for k, p in pipe.unet.attn_processors.items()
               if isinstance(p, CustomDiffusionAttnProcessor) and p.train_kv}
    assert trained == set(cross_attention_modules(pipe.unet)) and trained
    pipe.load_textual_inversion(token["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(token["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for key, proc in trainer.method.processors.items():
        torch.testing.assert_close(pipe.unet.attn_processors[key].to_k_custom_diffusion.weight,
                                   proc.to_k_custom_diffusion.weight.detach())
    image = _image(pipe, "a photo of <sks> dog")
    assert np.abs(image - base).max() > 1e-4
    ours = build_pipeline(sdxl_model, trainer.out, progress=False)
    pipe.scheduler = ours.scheduler  # ours samples with DPM-Solver
    np.testing.assert_allclose(_image(ours, "a photo of <sks> dog"), _image(pipe, "a photo of <sks> dog"),
                               atol=1e-5)


def test_merge_refuses_sdxl_custom_diffusion_runs_in_one_line(sdxl_cfg, tmp_path):
    from t2i_fast.merge import merge_runs

    run = train(sdxl_cfg.replace(method="custom_diffusion", max_steps=1)).out
    with pytest.raises(UserError, match="merge supports SD 1.x/2.x runs only"):
        merge_runs([str(run)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_lora_pivotal_token_on_sdxl_loads_through_diffusers(sdxl_cfg, sdxl_model):
    """--train-token: the token learns in both encoders beside the LoRA; the run loads in diffusers (the token
    with each encoder's load_textual_inversion, then load_lora_weights) and the token's rows are ours."""
    from t2i_fast.formats import TI_FILE
    from t2i_fast.sampling import build_pipeline
    from t2i_fast.trainer import Trainer

    trainer = Trainer(sdxl_cfg.replace(lr=1e-2, max_steps=3, train_token=True, train_text_encoder=True))
    trainer.run()
    assert sorted(load_file(trainer.out / TI_FILE)) == ["clip_g", "clip_l"]
    pipe = build_pipeline(sdxl_model, trainer.out, progress=False)
    for te, tok, embedding in ((pipe.text_encoder, pipe.tokenizer, trainer.method.embedding),
                               (pipe.text_encoder_2, pipe.tokenizer_2, trainer.method.embedding_2)):
        row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<sks>")]
        torch.testing.assert_close(row[None], embedding.new.detach())
        assert any("lora" in n for n, _ in te.named_modules())


def test_refiner_folder_is_refused_in_one_line(sdxl_model, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_model, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is an SDXL refiner") as e:
        load_components(refiner)
    assert "\n" not in str(e.value)


def test_sdxl_single_file_offline_says_how_to_convert(tmp_path):
    ckpt = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.out.0.weight": torch.ones(4)}, str(ckpt))
    with pytest.raises(UserError, match="StableDiffusionXLPipeline.from_single_file") as e:
        load_components(ckpt)
    assert "\n" not in str(e.value) and "convert" in str(e.value)


@pytest.mark.parametrize("changes", [{}, {"train_text_encoder": True, "cache_latents": False}], ids=["lora", "lora-te"])
def test_memory_plan_of_an_sdxl_run_is_within_10_percent(sdxl_cfg, changes, one_thread):
    from t2i_fast.memplan import estimate, measure

    cfg = sdxl_cfg.replace(mixed_precision="no", early_stop="dvar", **changes)
    planned, measured = estimate(cfg, target="cpu"), measure(cfg)
    assert [r.name for r in planned.rows] == [r.name for r in measured.rows]
    assert abs(planned.total / measured.total - 1) <= 0.10, (planned.table(), measured.table())
    assert abs(planned.get("step") / measured.get("step") - 1) <= 0.10, (planned.table(), measured.table())


def test_e4t_pretraining_refuses_sdxl_in_one_line(sdxl_model, concept_dir, tmp_path):
    from t2i_fast.e4t_pretrain import pretrain

    with pytest.raises(UserError, match=r"pretrain-e4t supports SD 1.x or SD 2.x models only, but .* is an SDXL "
                                        r"model") as e:
        pretrain(str(sdxl_model), str(concept_dir.parent), "dog", str(tmp_path / "out"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_textual_inversion_on_sdxl_learns_one_embedding_per_encoder(sdxl_cfg, sdxl_model):
    from t2i_fast.export import export
    from t2i_fast.formats import TI_FILE
    from t2i_fast.sampling import build_pipeline
    from t2i_fast.trainer import Trainer

    trainer = Trainer(sdxl_cfg.replace(method="textual_inversion", lr=5e-2, max_steps=4, num_vectors=2))
    encoders = trainer.comps.text_encoders
    before = [te.get_input_embeddings().weight.detach().clone() for te in encoders]
    init = [e.new.detach().clone() for e in trainer.method.embeddings]
    trainer.run()
    for te, old, start in zip(encoders, before, init):
        emb = te.get_input_embeddings()
        assert torch.equal(emb.weight[:emb.first_id], old[:emb.first_id])  # every original row bit-identical
        assert not torch.equal(emb.new, start)  # both encoders' vectors moved

    state = load_file(trainer.out / TI_FILE)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    pipe = _pipe(sdxl_model)
    base = _image(pipe, "a photo of")
    # diffusers' documented way of loading an SDXL embedding, one encoder at a time
    pipe.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    ours = build_pipeline(sdxl_model, trainer.out, progress=False)  # the run folder, through our loader
    for loaded in (pipe, ours):
        for te, tok, trained in ((loaded.text_encoder, loaded.tokenizer, encoders[0]),
                                 (loaded.text_encoder_2, loaded.tokenizer_2, encoders[1])):
            ids = tok.convert_tokens_to_ids(["<sks>", "<sks>_1"])
            torch.testing.assert_close(te.get_input_embeddings().weight[ids],
                                       trained.get_input_embeddings().new.detach())
    assert np.abs(_image(pipe, "a photo of <sks>") - base).max() > 1e-4

    exported = load_file(export(trainer.out, "a1111", out=trainer.out / "a1111"))
    assert sorted(exported) == ["clip_g", "clip_l"] and torch.equal(exported["clip_g"], state["clip_g"])


def test_dreambooth_on_sdxl_saves_an_sdxl_pipeline_with_prior(sdxl_cfg, sdxl_model, tmp_path, monkeypatch):
    """The UNet and both text encoders train, with class images generated by the SDXL base model; the run is a
    StableDiffusionXLPipeline folder that diffusers loads, and build_pipeline swaps its parts in."""
    from t2i_fast.sampling import build_pipeline

    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path / "cache"))
    result = train(sdxl_cfg.replace(method="dreambooth", lr=1e-3, max_steps=2, train_text_encoder=True,
                                    class_prompt="a photo of a dog", num_class_images=2))
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 2
    base, tuned = _pipe(sdxl_model), _pipe(result.out)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        changed = any(not torch.equal(a, b) for a, b in zip(getattr(base, name).state_dict().values(),
                                                            getattr(tuned, name).state_dict().values()))
        assert changed, name
    assert np.abs(_image(tuned) - _image(base)).max() > 1e-4
    swapped = build_pipeline(sdxl_model, result.out, progress=False)
    for a, b in zip(swapped.text_encoder_2.state_dict().values(), tuned.text_encoder_2.state_dict().values()):
        assert torch.equal(a, b)


def test_several_sdxl_adapters_in_one_batch_equal_each_alone(sdxl_lora_run, sdxl_model, concept_dir, tmp_path,
                                                              capsys):
    """Two SDXL LoRA runs that both call their token <sks> (one with LoRA on both text encoders, one with the
    token trained into both), and the base model, in one batch: each image equals its prompt drawn alone through
    build_pipeline (diffusers' own loaders), pooled embeddings and time ids included, one UNet pass per step."""
    from t2i_fast.sampling import MultiAdapterPipeline, build_pipeline

    token_run = train(TrainConfig(model=str(sdxl_model), images=str(concept_dir), class_word="dog", resolution=32,
                                  max_steps=4, lr=1e-2, num_samples=0, progress=False, lora_rank=4, train_token=True,
                                  token_lr=1e-1, early_stop="none", out=str(tmp_path / "token"))).out
    runs, prompt = [sdxl_lora_run, token_run], "a photo of <sks> dog"
    ids, seeds = [0, 1, -1], [3, 4, 5]

    def alone(run, seed):
        pipe = build_pipeline(sdxl_model, run, progress=False)
        return pipe(prompt, num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                    generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np").images[0]

    references = [alone(runs[a] if a >= 0 else None, s) for a, s in zip(ids, seeds)]
    multi = MultiAdapterPipeline(sdxl_model, runs)
    calls = []
    hook = multi.pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    images = multi.generate(prompt, adapters=ids, seeds=seeds, steps=2, guidance=7.5, output_type="np")
    hook.remove()
    assert calls == [6, 6]
    for aid in (0, 1):  # each text side: private token tables, every other weight of both encoders shared
        text, _ = multi.text_pipeline(aid)
        assert text is not multi.pipe
        for name in ("text_encoder", "text_encoder_2"):
            base_encoder, own = getattr(multi.pipe, name), getattr(text, name)
            table = base_encoder.get_input_embeddings().weight
            assert own.get_input_embeddings().weight is not table
            copied = {id(p) for p in own.parameters()}
            assert all(id(p) in copied for p in base_encoder.parameters() if p is not table)
    for i, ref in enumerate(references):
        err = float(np.abs(images[i] - ref).max())
        print(f"sample {i}: max |diff| {err:.1e}, the adapter's change {float(np.abs(ref - references[-1]).max()):.1e}")
        assert err < 1e-4, (i, err)
        if ids[i] >= 0:
            assert float(np.abs(ref - references[-1]).max()) > 1e-3  # the adapter changes the image
    out = tmp_path / "many"  # and from the command line
    code = main(["sample", "--model", str(sdxl_model), "--adapter", str(runs[0]), "--adapter", str(runs[1]),
                 "--prompt", prompt, "--n", "1", "--steps", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a0_000_seed0.png", "a1_000_seed0.png", "grid.png"]


def test_sdxl_single_file_goes_through_the_xl_loader(sdxl_model, tmp_path, monkeypatch):
    """An SDXL checkpoint (its tensor names say so) is read by StableDiffusionXLPipeline.from_single_file, which
    offline needs its config cached: that cache is stood in for by loading the tiny SDXL folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ckpt = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, str(ckpt))
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", lambda path, **kw: _pipe(sdxl_model))
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", lambda path, **kw: pytest.fail("SD loader"))
    comps = load_components(ckpt)
    assert comps.family == "sdxl" and type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert comps.tokenizer_2.pad_token == "!"


def test_an_sdxl_adapter_on_an_sd1_model_is_refused_in_one_line(sdxl_lora_run, tiny_model, tmp_path, capsys):
    code = main(["sample", "--model", str(tiny_model), "--adapter", str(sdxl_lora_run), "--prompt", "a dog",
                 "--n", "1", "--steps", "1", "--out", str(tmp_path / "x")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "another base model" in errors[0], errors
    assert not (tmp_path / "x").exists()


def test_an_sd1_token_file_on_an_sdxl_pipeline_is_refused_in_one_line(sdxl_model, tmp_path):
    """A {token: vectors} file would fit SDXL's first encoder only (both are 32 wide on the tiny models); it is
    refused, as an SDXL file on an SD 1.x pipeline is."""
    from t2i_fast.adapter_files import load_layouts
    from t2i_fast.formats import TI_FILE, save_textual_inversion

    save_textual_inversion(tmp_path / TI_FILE, "<sks>", torch.zeros(1, 32))
    pipe = _pipe(sdxl_model)
    with pytest.raises(UserError, match="is an SD 1.x/2.x token embedding; the adapter was made for another base"):
        load_layouts(pipe, tmp_path, [TI_FILE])
    assert "<sks>" not in pipe.tokenizer.get_vocab()
