"""Fast tier of the training core: each method trains on the tiny model, saves files that diffusers'
own loaders read, and the loop is exact (cache on/off, resume, untouched embedding rows)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2i_fast import train
from t2i_fast.formats import LORA_FILE, TI_FILE
from t2i_fast.trainer import Trainer


def fixed_batch_loss(trainer: Trainer, batch) -> float:
    with torch.no_grad():
        return trainer.loss(batch).item()


@pytest.mark.parametrize("method,lr,min_drop", [("lora", 1e-2, 0.2), ("textual_inversion", 5e-2, 0.0)])
def test_loss_falls_on_two_image_overfit(base_cfg, method, lr, min_drop):
    # On a random tiny model a token embedding can move the loss only a little, a LoRA a lot: the
    # fixed-batch loss (same latents, noise, timesteps) must fall, by more than min_drop relative.
    trainer = Trainer(base_cfg.replace(method=method, lr=lr, max_steps=50))
    batch = trainer._build_batches().draw(torch.Generator().manual_seed(123), 8)
    before = fixed_batch_loss(trainer, batch)
    result = trainer.run()
    after = fixed_batch_loss(trainer, batch)
    assert result.steps == 50 and len(result.losses) == 50
    assert after < before * (1 - min_drop), (before, after)


def test_outputs_report_log_and_grid(base_cfg, tmp_path):
    result = train(base_cfg.replace(num_samples=2, sample_steps=2))
    out = result.out
    for name in (LORA_FILE, "report.json", "log.jsonl", "samples.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["config"]["method"] == "lora"
    assert report["final_loss"] == pytest.approx(result.losses[-1])
    assert report["peak_memory_mb"] > 0 and report["wall_time_s"] > 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]


def _image(pipe, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images[0]


def test_lora_file_loads_in_diffusers_and_changes_output(base_cfg, tiny_model):
    from diffusers import StableDiffusionPipeline

    result = train(base_cfg.replace(lr=1e-2, max_steps=5))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    prompt = "a photo of <sks> dog"
    base = _image(pipe, prompt)
    pipe.load_lora_weights(result.out, weight_name=LORA_FILE)
    with_lora = _image(pipe, prompt)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.unload_lora_weights()
    np.testing.assert_allclose(_image(pipe, prompt), base, atol=1e-6)


def test_lora_matches_our_modules(base_cfg, tiny_model):
    # the saved file reproduces the trained UNet exactly when diffusers loads it (alpha folded into B)
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(base_cfg.replace(lr=1e-2, max_steps=3, lora_alpha=16))
    trainer.run()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(trainer.out, weight_name=LORA_FILE)
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = trainer.comps.unet.to("cpu")(x, t, h).sample
        theirs = pipe.unet(x, t, h).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_textual_inversion_loads_and_keeps_other_rows(base_cfg, tiny_model):
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(base_cfg.replace(method="textual_inversion", lr=5e-2, max_steps=5, num_vectors=2))
    before = trainer.comps.text_encoder.get_input_embeddings().weight.detach().clone()
    init = trainer.method.embedding.new.detach().clone()
    trainer.run()
    emb = trainer.comps.text_encoder.get_input_embeddings()
    first = emb.first_id
    assert torch.equal(emb.weight[:first], before[:first])  # every original row bit-identical
    assert not torch.equal(emb.new, init)  # the new vectors moved
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    prompt = "a photo of <sks>"
    base = _image(pipe, "a photo of")
    pipe.load_textual_inversion(str(trainer.out / TI_FILE), token="<sks>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], emb.new.detach())
    assert np.abs(_image(pipe, prompt) - base).max() > 1e-4


def test_cache_on_and_off_give_the_same_first_loss(base_cfg, tmp_path):
    # cached latents/text are exact: same seed, same first-step loss (batch of one encodes identically)
    on = train(base_cfg.replace(max_steps=1, out=str(tmp_path / "on")))
    off = train(base_cfg.replace(max_steps=1, out=str(tmp_path / "off"), cache_latents=False, cache_text=False))
    assert on.losses[0] == pytest.approx(off.losses[0], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_resume_continues_identically(base_cfg, tmp_path, method):
    from safetensors.torch import load_file

    name = LORA_FILE if method == "lora" else TI_FILE
    cfg = base_cfg.replace(method=method, lr=1e-2)
    straight = train(cfg.replace(max_steps=10, out=str(tmp_path / "straight")))
    train(cfg.replace(max_steps=5, out=str(tmp_path / "split")))
    resumed = train(cfg.replace(max_steps=10, out=str(tmp_path / "split"), resume=True))
    assert resumed.steps == 10
    a, b = load_file(straight.out / name), load_file(resumed.out / name)
    assert a.keys() == b.keys()
    for k in a:  # same arithmetic in the same order on the CPU: identical to float rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(straight.losses, resumed.losses, rtol=1e-6)


def test_lora_with_text_encoder_and_pivotal_token(base_cfg, tiny_model):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    result = train(base_cfg.replace(train_text_encoder=True, train_token=True, lr=1e-2, max_steps=3))
    keys = load_file(result.out / LORA_FILE).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    assert (result.out / TI_FILE).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    from t2i_fast.sampling import load_adapter

    assert load_adapter(pipe, result.out) == [TI_FILE, LORA_FILE]


def test_min_snr_and_v_prediction_train(base_cfg, tiny_model, tmp_path):
    import shutil

    vmodel = tmp_path / "vpred"
    shutil.copytree(tiny_model, vmodel)
    sched = vmodel / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["prediction_type"] = "v_prediction"
    sched.write_text(json.dumps(cfg))
    trainer = Trainer(base_cfg.replace(model=str(vmodel), snr_gamma=5.0, lr_schedule="cosine", warmup_steps=1,
                                       grad_accum=2, gradient_checkpointing=True))
    assert trainer.comps.prediction_type == "v_prediction"
    result = trainer.run()
    assert result.steps == 3 and all(np.isfinite(result.losses))


def test_public_api_is_small_and_lazy():
    import subprocess
    import sys

    code = ("import sys, t2i_fast; "
            "assert sorted(t2i_fast.__all__) == sorted(['MultiAdapterPipeline', 'PRESETS', 'TrainConfig', "
            "'TrainResult', '__version__', 'load_adapter', 'patch', 'sample', 'train', 'train_many', 'unpatch']), "
            "t2i_fast.__all__; "
            "heavy = [m for m in ('torch', 'triton', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "assert t2i_fast.MultiAdapterPipeline.__name__ == 'MultiAdapterPipeline'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_textual_inversion_token_lr(base_cfg, tmp_path):
    """--token-lr is the learning rate of the token textual inversion trains (its only parameter)."""
    import json

    run = train(base_cfg.replace(method="textual_inversion", lr=1e-2, token_lr=3e-2, max_steps=1,
                                 out=str(tmp_path / "ti")))
    logged = [json.loads(line)["lr"] for line in (run.out / "log.jsonl").read_text().splitlines()]
    assert logged == [pytest.approx(3e-2)]


def test_lora_on_frozen_tokens_loads_alone(base_cfg, tiny_model, tmp_path):
    """A LoRA trained with --init-embeddings keeps a copy of them: its run folder loads with the token."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from t2i_fast.formats import INIT_FILE
    from t2i_fast.sampling import load_adapter

    ti = train(base_cfg.replace(method="textual_inversion", token="<tok>", max_steps=1, out=str(tmp_path / "ti")))
    lora = train(base_cfg.replace(method="lora", token="<tok>", max_steps=1, out=str(tmp_path / "lora"),
                                  init_embeddings=str(ti.out / TI_FILE)))
    assert INIT_FILE in lora.files
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert load_adapter(pipe, lora.out) == [INIT_FILE, LORA_FILE]
    row = pipe.tokenizer.convert_tokens_to_ids("<tok>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[row],
                               load_file(ti.out / TI_FILE)["<tok>"].reshape(-1))
