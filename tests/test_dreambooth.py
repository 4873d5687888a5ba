"""DreamBooth on the tiny model: the whole UNet (and text encoder) trains with prior preservation, and the
run folder is a diffusers pipeline that StableDiffusionPipeline.from_pretrained loads as trained."""
from __future__ import annotations

import pytest
import torch

from t2i_fast.errors import UserError
from t2i_fast.trainer import Trainer

PARTS = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
         "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer_config.json",
         "scheduler/scheduler_config.json")


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    from t2i_fast.testing import write_concept_images

    folder = write_concept_images(tmp_path_factory.mktemp("class") / "dogs", n=2, size=64, seed=7)
    (folder / "img_0.txt").write_text("a photo of a dog on grass")
    return folder


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet.to("cpu")(x, torch.tensor([500]), h).sample


def _te_out(te, ids):
    with torch.no_grad():
        return te.to("cpu")(ids)[0]


def test_trains_unet_and_text_encoder_with_prior_and_loads_in_diffusers(base_cfg, tiny_model, class_dir):
    from diffusers import StableDiffusionPipeline

    from t2i_fast.sampling import load_adapter

    trainer = Trainer(base_cfg.replace(method="dreambooth", lr=1e-3, max_steps=6, class_images=str(class_dir),
                                       prior_loss_weight=0.5, train_text_encoder=True, early_stop="none"))
    assert trainer.prior is not None and trainer.method.trains_text_encoder
    batch = trainer._build_batches().draw(torch.Generator().manual_seed(0), 4)
    # instance examples, then as many class examples weighted by the prior loss weight
    assert batch.weights.tolist() == [1.0] * 4 + [0.5] * 4 and batch.num_instance == 4
    with torch.no_grad():
        before = trainer.loss(batch).item()
    result = trainer.run()
    with torch.no_grad():
        after = trainer.loss(batch).item()
    assert after < before, (before, after)
    out = result.out
    for part in PARTS:
        assert (out / part).is_file(), part
    assert not list(out.rglob("*.bin")) and not (out / ".pipeline.tmp").exists()

    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    ours = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert ours.unet.dtype == torch.float32
    trained = _unet_out(trainer.comps.unet)
    torch.testing.assert_close(_unet_out(ours.unet), trained, rtol=1e-5, atol=1e-5)
    assert (_unet_out(base.unet) - trained).abs().max() > 1e-4  # it trained
    ids = base.tokenizer(["a photo of <sks> dog"], padding="max_length", return_tensors="pt").input_ids
    torch.testing.assert_close(_te_out(ours.text_encoder, ids), _te_out(trainer.comps.text_encoder, ids),
                               rtol=1e-5, atol=1e-5)
    # sampling's loader swaps the run's modules into a base pipeline
    assert load_adapter(base, out) == ["unet", "text_encoder", "tokenizer"]
    torch.testing.assert_close(_unet_out(base.unet), trained, rtol=1e-5, atol=1e-5)


def test_low_memory_switches(base_cfg, tiny_model):
    from safetensors.torch import load_file

    trainer = Trainer(base_cfg.replace(method="dreambooth", lr=1e-3, max_steps=2, gradient_checkpointing=True,
                                       optimizer="adamw8bit", cache_latents=True, early_stop="none"))
    assert trainer.comps.unet.is_gradient_checkpointing
    result = trainer.run()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert trainer.comps.vae.device.type == "cpu"  # cached latents: the VAE is off the step's device
    name = "unet/diffusion_pytorch_model.safetensors"
    saved, base = load_file(result.out / name), load_file(tiny_model / name)
    assert any(not torch.equal(saved[k], base[k]) for k in base)


def test_frozen_text_encoder_is_written_from_the_base_model(base_cfg, tiny_model):
    # With mixed precision the frozen text encoder trains as a reduced-precision copy; the saved pipeline
    # must hold the base model's fp32 weights, not that copy.
    from safetensors.torch import load_file

    trainer = Trainer(base_cfg.replace(method="dreambooth", lr=1e-3, max_steps=1, early_stop="none",
                                       cache_latents=False))
    trainer.comps.text_encoder.to(torch.bfloat16)
    trainer.run()
    saved = load_file(trainer.out / "text_encoder" / "model.safetensors")
    original = load_file(tiny_model / "text_encoder" / "model.safetensors")
    assert saved.keys() == original.keys()
    for k in saved:
        assert saved[k].dtype == torch.float32 and torch.equal(saved[k], original[k]), k


def test_class_images_generated_from_a_class_prompt_and_cached(base_cfg, tmp_path, monkeypatch):
    import t2i_fast.sampling as sampling

    fast = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: fast(*a, **{**kw, "steps": 2}))  # keep it quick
    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path / "cache"))
    cfg = base_cfg.replace(method="dreambooth", class_prompt="a photo of a dog", num_class_images=2)
    trainer = Trainer(cfg)
    assert len(trainer.prior.images) == 2 and trainer.prior.captions == ["a photo of a dog"] * 2
    (folder,) = (tmp_path / "cache" / "class_images").iterdir()
    stamp = (folder / "class_0000.png").stat().st_mtime_ns
    Trainer(cfg)  # the second run reuses the cached images
    assert (folder / "class_0000.png").stat().st_mtime_ns == stamp


def test_an_interrupted_class_image_generation_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C after 2 of 4 class images: the 2 are kept in a work folder beside the cache folder; the next
    generation takes that folder over (here as if its process had died) and draws only images 2 and 3. A live
    process's work folder is left alone. The images equal an uninterrupted generation's."""
    import socket
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from t2i_fast import class_images

    real, drawn = class_images.generate, []

    def counting(pipe, prompt, n=1, seed=0, **kw):
        if seed == stop_at:
            raise KeyboardInterrupt
        drawn.append(seed)
        return real(pipe, prompt, n=n, seed=seed, **kw)

    monkeypatch.setattr(class_images, "generate", counting)
    folder, args = tmp_path / "cache" / "key", ("a photo of a dog", 4, 32)
    stop_at = 12
    with pytest.raises(KeyboardInterrupt):
        class_images.generate_class_images(str(tiny_model), *args, folder, 10, device="cpu", progress=False)
    (work,) = folder.parent.iterdir()
    assert "2 of 4 are kept in" in capsys.readouterr().err and not folder.exists()
    assert sorted(p.name for p in work.glob("*.png")) == ["class_0000.png", "class_0001.png"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    work.rename(folder.with_name(f"key.tmp-{host}-{dead}"))  # its process is gone
    live = folder.with_name(f"key.tmp-{host}-1")  # pid 1 is always alive
    live.mkdir()
    (live / "class_0002.png").write_bytes(b"not an image")
    stop_at, drawn[:] = None, []
    class_images.generate_class_images(str(tiny_model), *args, folder, 10, device="cpu", progress=False)
    assert drawn == [12, 13]  # only the missing ones
    assert sorted(p.name for p in folder.iterdir()) == sorted(["done"] + [f"class_{i:04d}.{e}" for i in range(4)
                                                                         for e in ("png", "txt")])
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key", live.name]  # the live one untouched

    class_images.generate_class_images(str(tiny_model), *args, tmp_path / "alone", 10, device="cpu", progress=False)
    for i in range(4):
        a, b = (np.asarray(Image.open(f / f"class_{i:04d}.png"), dtype=int) for f in (folder, tmp_path / "alone"))
        assert np.abs(a - b).max() <= 1


def test_rejects_train_token(base_cfg):
    with pytest.raises(UserError, match="--train-token"):
        Trainer(base_cfg.replace(method="dreambooth", train_token=True))


def test_master_weights_are_the_base_weights_under_mixed_precision(base_cfg, tiny_model, monkeypatch):
    """Where the compute dtype is 16-bit (bf16 on a GPU), the UNet DreamBooth trains is not cast to it first:
    its fp32 master weights start exactly at the base model's, while frozen parts take the compute dtype."""
    from t2i_fast import trainer as trainer_module
    from t2i_fast.models import load_components
    from t2i_fast.trainer import Trainer

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: torch.bfloat16)
    t = Trainer(base_cfg.replace(method="dreambooth", max_steps=1))
    base = load_components(tiny_model)
    for (name, ours), (_, theirs) in zip(t.comps.unet.state_dict().items(), base.unet.state_dict().items()):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), name
    assert t.comps.text_encoder.dtype == torch.bfloat16  # frozen: the compute dtype
