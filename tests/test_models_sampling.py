"""Loading local models (never the network) and sampling with an adapter through the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.errors import UserError
from t2i_fast.models import detect_family, load_components


def test_loads_tiny_model_and_detects_family(tiny_model):
    comps = load_components(tiny_model)
    assert comps.family == "sd1" and comps.prediction_type == "epsilon"
    assert comps.native_resolution == 32 and comps.vae_scale_factor == 2
    assert not any(p.requires_grad for p in comps.unet.parameters())


def test_family_detection_from_config():
    assert detect_family({"cross_attention_dim": 768}) == "sd1"
    assert detect_family({"cross_attention_dim": 1024}) == "sd2"
    assert detect_family({"cross_attention_dim": 2048}) == "sdxl"
    assert detect_family({"cross_attention_dim": 80, "addition_embed_type": "text_time"}) == "sdxl"


@pytest.mark.parametrize("missing", ["model_index.json", "text_encoder", "vae/config.json"])
def test_incomplete_model_folder_names_the_file(tmp_path, tiny_model, missing):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    target = model / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=missing.split("/")[0]):
        load_components(model)


def test_single_file_checkpoint_offline_says_how_to_convert(tmp_path, tiny_model):
    from safetensors.torch import save_file

    comps = load_components(tiny_model)
    ckpt = tmp_path / "model.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in list(comps.unet.state_dict().items())[:4]},
              str(ckpt))
    with pytest.raises(UserError, match="convert"):
        load_components(ckpt)


def test_sample_cli_writes_images_and_grid(tmp_path, tiny_model, base_cfg, capsys):
    from t2i_fast import train

    run = train(base_cfg.replace(max_steps=1)).out
    out = tmp_path / "imgs"
    code = main(["sample", "--model", str(tiny_model), "--adapter", str(run), "--prompt", "a photo of <sks> dog",
                 "--n", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_seed0.png", "001_seed1.png", "grid.png"]
    # one image per UNet pass draws the same images, up to float rounding
    code = main(["sample", "--model", str(tiny_model), "--adapter", str(run), "--prompt", "a photo of <sks> dog",
                 "--n", "2", "--steps", "2", "--batch", "1", "--out", str(tmp_path / "one-by-one")])
    assert code == 0
    for name in ("000_seed0.png", "001_seed1.png"):
        a, b = (np.asarray(Image.open(folder / name), dtype=int) for folder in (out, tmp_path / "one-by-one"))
        assert np.abs(a - b).max() <= 1
    # an adapter folder with nothing in it is refused in one line
    (tmp_path / "empty").mkdir()
    code = main(["sample", "--model", str(tiny_model), "--adapter", str(tmp_path / "empty"), "--prompt", "x",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "holds no adapter file" in capsys.readouterr().err

    # bad flags are one-line errors, found before the model loads, and nothing is written
    for flags, needle in ((["--n", "0"], "--n"), (["--steps", "0"], "--steps"), (["--batch", "0"], "--batch"),
                          (["--resolution", "100"], "96"),
                          (["--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "--device")):
        bad = tmp_path / "bad"
        code = main(["sample", "--model", str(tiny_model), "--adapter", str(run), "--prompt", "x",
                     "--out", str(bad), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], (flags, err)
        assert not bad.exists()


def test_report_config_roundtrips_into_trainconfig(base_cfg):
    from t2i_fast import TrainConfig, train

    run = train(base_cfg.replace(max_steps=1)).out
    cfg = TrainConfig.from_dict(json.loads((run / "report.json").read_text())["config"])
    assert cfg.max_steps == 1 and cfg.method == "lora"


def test_single_file_model_trains_and_samples(tmp_path, tiny_model, concept_dir, monkeypatch):
    """Where diffusers can read a single-file checkpoint offline (its config cached), the whole run works from
    it, sample grid included. The cached config is stood in for by loading the same tiny model's folder."""
    from diffusers import StableDiffusionPipeline

    from t2i_fast import TrainConfig, train

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")  # only its name and suffix matter to our loader; diffusers' reader is replaced
    folder_pipe = StableDiffusionPipeline.from_pretrained
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file",
                        lambda path, **kw: folder_pipe(tiny_model, safety_checker=None))
    run = train(TrainConfig(model=str(ckpt), images=str(concept_dir), class_word="dog", resolution=32,
                            max_steps=1, num_samples=1, sample_steps=2, progress=False, out=str(tmp_path / "run")))
    assert "samples.png" in run.files and (run.out / "report.json").is_file()


def test_a_batched_image_is_the_one_drawn_alone(tiny_model):
    """generate denoises several images per UNet call; image i still comes from its own seed, so drawing it
    alone (n=1, seed + i) gives the same image up to float rounding, and a different seed does not."""
    import numpy as np

    from t2i_fast.sampling import build_pipeline, generate

    pipe = build_pipeline(tiny_model, progress=False)
    batched = generate(pipe, "a photo of a dog", n=3, seed=5, steps=3, resolution=32)
    alone = generate(pipe, "a photo of a dog", n=1, seed=6, steps=3, resolution=32)[0]
    as_array = lambda img: np.asarray(img, dtype=np.int16)  # noqa: E731
    assert len(batched) == 3
    assert np.abs(as_array(batched[1]) - as_array(alone)).max() <= 2  # 8-bit pixels, rounding apart
    assert np.abs(as_array(batched[0]) - as_array(alone)).max() > 2


def test_folding_the_lora_keeps_the_image(tiny_model, base_cfg):
    """fuse_loaded_loras (sample, the sample grid, the toy evaluator) folds the LoRA diffusers loaded into the
    base weights, text encoder included, and removes its layers; the image stays what the unfolded layers draw,
    which differs from the base model's. A pipeline without LoRA, or in half precision, is left as it is."""
    import numpy as np

    from t2i_fast import train
    from t2i_fast.adapter_files import fuse_loaded_loras
    from t2i_fast.sampling import build_pipeline

    run = train(base_cfg.replace(max_steps=3, lr=5e-2, train_text_encoder=True, early_stop="none")).out

    def draw(pipe):
        return pipe("a photo of <sks> dog", num_inference_steps=3, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    def lora_layers(pipe):
        return [n for part in (pipe.unet, pipe.text_encoder) for n, _ in part.named_modules() if "lora_A" in n]

    pipe = build_pipeline(tiny_model, run, progress=False)
    unfolded = draw(pipe)
    assert lora_layers(pipe) and fuse_loaded_loras(pipe)
    assert not lora_layers(pipe)
    assert np.abs(draw(pipe) - unfolded).max() < 1e-4
    base = build_pipeline(tiny_model, progress=False)
    assert np.abs(draw(base) - unfolded).max() > 1e-3
    assert not fuse_loaded_loras(base)
    half = build_pipeline(tiny_model, run, progress=False).to(torch.bfloat16)
    assert not fuse_loaded_loras(half) and lora_layers(half)
