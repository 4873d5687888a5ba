"""`t2i-fast export`: the kohya LoRA layout that diffusers' load_lora_weights reads to the same image as our
diffusers-layout file, the A1111 embedding, and clear refusals (no such format, incomplete run folder)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from t2i_fast.cli import main
from t2i_fast.errors import UserError
from t2i_fast.export import export
from t2i_fast.formats import LORA_FILE, TI_FILE


@pytest.fixture(scope="module")
def lora_run(tiny_model, concept_dir, tmp_path_factory):
    """A LoRA run with text-encoder LoRA and a pivotal token, so it has both exportable files."""
    from t2i_fast import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", resolution=32,
                      max_steps=3, lr=1e-2, num_samples=0, progress=False, lora_rank=4, lora_alpha=8,
                      train_text_encoder=True, train_token=True, early_stop="none",
                      out=str(tmp_path_factory.mktemp("export") / "run"))
    return train(cfg).out


def _image(pipe, prompt="a photo of dog", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images[0]


def test_kohya_export_loads_in_diffusers_like_our_file(lora_run, tiny_model, capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(lora_run), "--format", "kohya"]) == 0
    path = lora_run / "export" / "sks_lora.safetensors"
    assert str(path) in capsys.readouterr().out
    kohya, ours = load_file(path), load_file(lora_run / LORA_FILE)
    assert len(kohya) == len(ours) // 2 * 3  # down, up, alpha per module
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    ours_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"
    torch.testing.assert_close(kohya[f"{name}.lora_down.weight"], ours[ours_key])
    te = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    ours_te = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in ours.items()}  # transformers 4/5
    torch.testing.assert_close(kohya[f"{te}.lora_up.weight"],
                               ours_te["text_encoder.encoder.layers.1.self_attn.q_proj.lora_B.weight"])
    assert kohya[f"{name}.alpha"].item() == 4.0  # = rank: the scale is folded into lora_up
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"

    base_pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = _image(base_pipe)
    base_pipe.load_lora_weights(lora_run, weight_name=LORA_FILE)
    with_ours = _image(base_pipe)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    with_kohya = _image(pipe)
    assert any("lora" in n for n, _ in pipe.text_encoder.named_modules())  # the lora_te_ keys were read
    assert np.abs(with_ours - base).max() > 1e-3  # the LoRA (UNet and text encoder) does something
    np.testing.assert_allclose(with_kohya, with_ours, atol=1e-5)


def test_a1111_embedding(lora_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    path = export(lora_run, "a1111", out=lora_run / "a1111", dtype="fp16")
    assert path == lora_run / "a1111" / "sks.safetensors"
    tensors = load_file(path)
    learned = load_file(lora_run / TI_FILE)["<sks>"]
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].dtype == torch.float16
    torch.testing.assert_close(tensors["emb_params"].float(), learned, rtol=1e-3, atol=1e-3)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["name"] == "sks" and f.metadata()["step"] == "3"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion(str(path), token="sks")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks")]
    torch.testing.assert_close(row[None], tensors["emb_params"].float())


def _fake_run(folder, method, files=(), **config):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"method": method, "files": list(files),
                                                    "config": {"method": method, **config}}))
    return folder


@pytest.mark.parametrize("method,fmt,message", [
    ("dreambooth", "kohya", "method dreambooth has no kohya format: it saves a whole diffusers pipeline folder"),
    ("textual_inversion", "kohya", "method textual_inversion has no kohya format"),
    ("custom_diffusion", "a1111", "method custom_diffusion has no a1111 format"),
    ("lora", "a1111", "has no textual-inversion embedding (learned_embeds.safetensors)"),
])
def test_refuses_a_method_without_that_format(tmp_path, capsys, method, fmt, message):
    run = _fake_run(tmp_path / "run", method)
    assert main(["export", str(run), "--format", fmt]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (run / "export").exists()


def test_refuses_an_incomplete_run_folder(tmp_path, lora_run):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint").mkdir(parents=True)
    with pytest.raises(UserError, match=r"unfinished/report.json is missing: the run did not finish; .*--resume"):
        export(unfinished, "kohya")
    lost = _fake_run(tmp_path / "lost", "lora", files=[LORA_FILE, "report.json"])
    with pytest.raises(UserError, match=r"lost/pytorch_lora_weights.safetensors is missing: the run folder is "
                                        r"incomplete"):
        export(lost, "kohya")
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "nowhere", "kohya")
    for folder in (unfinished, lost):
        assert not (folder / "export").exists()
    # a single adapter file exports too, and a file of the wrong kind is refused
    assert export(lora_run / LORA_FILE, "kohya", out=tmp_path / "single.safetensors").is_file()
    with pytest.raises(UserError, match="not a textual-inversion embedding"):
        export(lora_run / LORA_FILE, "a1111", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_other_files_of_the_run_are_not_needed(lora_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    report = json.loads((run / "report.json").read_text())
    others = [n for n in report["files"] if n not in (LORA_FILE, "report.json")]
    assert others  # the grid, log, ...
    for name in others:
        (run / name).unlink()
    assert export(run, "kohya").is_file()


def test_flags_before_the_run_folder(lora_run, tmp_path):
    """The delegated commands get their arguments in the user's order: a leading flag keeps its value."""
    first, last = tmp_path / "first.safetensors", tmp_path / "last.safetensors"
    assert main(["export", "--format", "kohya", "--out", str(first), str(lora_run)]) == 0
    assert main(["export", str(lora_run), "--format", "kohya", "--out", str(last)]) == 0
    a, b = load_file(first), load_file(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_written_files_are_readable_by_others(lora_run, tmp_path):
    """safetensors writes 0600; what we write takes the usual mode (0666 less the umask), so a UI server
    running as another user can read an exported LoRA."""
    import os

    mask = os.umask(0o022)
    try:
        path = export(lora_run, "kohya", out=tmp_path / "shared.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
