"""Every mistake a user can make at the start of a run: one line naming the file or flag and the fix,
exit status 2, and no output folder left behind."""
from __future__ import annotations

import json
import shutil

import pytest

from t2i_fast.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["train", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def common(tiny_model, concept_dir):
    return ["--model", tiny_model, "--images", concept_dir, "--class-word", "dog", "--resolution", 32,
            "--max-steps", 1, "--num-samples", 0, "--no-progress"]


def assert_refused(code, line, out, *needles):
    assert code == 2
    assert line.startswith("error: ") and "\n" not in line
    for n in needles:
        assert n in line, (n, line)
    assert not out.exists(), "a refused run must leave nothing behind"


def test_missing_image_folder(capsys, tmp_path, tiny_model):
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--model", tiny_model, "--images", tmp_path / "nope", "--out", out)
    assert_refused(code, line, out, str(tmp_path / "nope"), "--images")


def test_empty_image_folder(capsys, tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--model", tiny_model, "--images", tmp_path / "empty", "--out", out)
    assert_refused(code, line, out, "holds no images")


def test_corrupt_image(capsys, tmp_path, tiny_model, concept_dir):
    images = tmp_path / "imgs"
    shutil.copytree(concept_dir, images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--model", tiny_model, "--images", images, "--out", out)
    assert_refused(code, line, out, "broken.png", "remove or replace")


def test_model_folder_without_unet(capsys, tmp_path, tiny_model, concept_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    shutil.rmtree(model / "unet")
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--model", model, "--images", concept_dir, "--out", out)
    assert_refused(code, line, out, "unet", str(model))


def test_token_already_in_vocabulary(capsys, tmp_path, common):
    out = tmp_path / "out"
    code, line = run_cli(capsys, *common, "--method", "textual_inversion", "--token", "a", "--out", out)
    assert_refused(code, line, out, "--token 'a'", "already in the tokenizer")


def test_resolution_not_multiple_of_8(capsys, tmp_path, tiny_model, concept_dir):
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--model", tiny_model, "--images", concept_dir, "--resolution", 30, "--out", out)
    assert_refused(code, line, out, "--resolution 30", "multiple of 8")


def test_unknown_method(capsys, tmp_path, common):
    out = tmp_path / "out"
    code, line = run_cli(capsys, *common, "--method", "hypernetwork", "--out", out)
    assert_refused(code, line, out, "hypernetwork", "lora")


def test_config_file_with_unknown_key(capsys, tmp_path, common):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('method = "lora"\nlearning_rate = 0.1\n')
    out = tmp_path / "out"
    code, line = run_cli(capsys, *common, "--config", cfg, "--out", out)
    assert_refused(code, line, out, "learning_rate", str(cfg))


def test_finished_run_is_not_overwritten(capsys, tmp_path, common):
    out = tmp_path / "out"
    assert main(["train", *map(str, common), "--out", str(out)]) == 0
    report = (out / "report.json").read_text()
    code, line = run_cli(capsys, *common, "--out", out)
    assert code == 2 and "already holds a finished run" in line and "--overwrite" in line
    assert (out / "report.json").read_text() == report  # untouched
    assert main(["train", *map(str, common), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 1


def test_config_file_and_flags_merge(capsys, tmp_path, common):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "textual_inversion", "lr": 0.01, "max_steps": 5}))
    out = tmp_path / "out"
    assert main(["train", *map(str, common), "--config", str(cfg), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    # file values over method defaults, flags over the file (--max-steps 1 in common)
    assert report["config"]["method"] == "textual_inversion"
    assert report["config"]["lr"] == 0.01 and report["steps"] == 1


@pytest.mark.parametrize("flag,value,needle", [
    ("--optimizer", "adam8bit", "adamw8bit"),
    ("--lr-schedule", "cosin", "cosine"),
    ("--early-stop", "dvr", "dvar"),
    ("--dvar-window", 0, "--dvar-window"),
    ("--dvar-threshold", 2, "--dvar-threshold"),
    ("--probe-every", -1, "--probe-every"),
    ("--few-steps", 0, "--few-steps"),
    ("--log-every", 0, "--log-every"),
    ("--checkpoint-every", -2, "--checkpoint-every"),
])
def test_bad_option_with_overwrite_keeps_the_finished_run(capsys, tmp_path, common, flag, value, needle):
    """Every option is checked before the output folder is touched: --overwrite must not delete the previous
    run when the new one is refused."""
    out = tmp_path / "out"
    assert main(["train", *map(str, common), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    code, line = run_cli(capsys, *common, "--out", out, "--overwrite", flag, value)
    assert code == 2 and line.startswith("error: ") and needle in line, line
    assert sorted(p.name for p in out.iterdir()) == before


def test_preset_flag_over_preset_in_config_file(capsys, tmp_path, common):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('preset = "sd15-lora"\nlr = 0.02\n')
    out = tmp_path / "out"
    assert main(["train", *map(str, common), "--config", str(cfg), "--preset", "sd15-ti", "--out", str(out)]) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["method"] == "textual_inversion" and config["lr"] == 0.02  # the flag's preset, the file's lr


@pytest.mark.parametrize("method", [["--method", "textual_inversion"], ["--method", "lora", "--train-token"]])
def test_concepts_file_with_a_single_trained_token(capsys, tmp_path, common, concept_dir, method):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"images": str(concept_dir), "token": "<dogx>", "class_word": "dog"}]))
    out = tmp_path / "out"
    code, line = run_cli(capsys, *common, *method, "--concepts", concepts, "--out", out)
    assert_refused(code, line, out, "--concepts", "custom_diffusion")


def test_sd15_preset_without_a_model(capsys, tmp_path):
    out = tmp_path / "out"
    code, line = run_cli(capsys, "--preset", "sd15-lora", "--out", out)
    assert_refused(code, line, out, "--preset sd15-lora", "--model")
