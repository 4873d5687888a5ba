"""The run folder is safe: --overwrite deletes only a run of ours and never an input, a diverged run stops
and nothing loads its weights, and a kill, SIGTERM, Ctrl-C, full disk or damaged checkpoint loses no work
and says what to do in one line."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from t2i_fast import TrainConfig, train
from t2i_fast.cli import main
from t2i_fast.errors import UserError
from t2i_fast.formats import LORA_FILE, TI_FILE
from t2i_fast.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """A kill -9 at that moment: nothing after it runs (no except clause of ours catches it)."""


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_one_line(code, line, *needles):
    assert code == 2 and line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)


@pytest.fixture
def images(concept_dir, tmp_path):
    """A private copy of the concept: an unsafe --overwrite may delete it without harming other tests."""
    return shutil.copytree(concept_dir, tmp_path / "dog")


@pytest.fixture
def common(tiny_model, images):
    return ["train", "--model", tiny_model, "--images", images, "--class-word", "dog", "--resolution", 32,
            "--max-steps", 1, "--num-samples", 0, "--no-progress", "--early-stop", "none"]


def log_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def kill_at_training_step(monkeypatch, n, exc=Killed):
    """Raise `exc` when the n-th training step computes its loss (the probe's no-grad losses do not count)."""
    loss, calls = Trainer.loss, []

    def killed(self, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == n:
                raise exc
        return loss(self, batch)

    monkeypatch.setattr(Trainer, "loss", killed)


# --- --overwrite deletes only a run of ours, never an input

def test_overwrite_refuses_a_folder_that_holds_no_run(capsys, tmp_path, common):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, line = run_cli(capsys, *common, "--out", mine, "--overwrite")
    assert_one_line(code, line, str(mine), "holds no t2i-fast run", "notes.txt")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_overwrite_removes_only_our_files(capsys, tmp_path, common):
    out = tmp_path / "run"
    assert main([*map(str, common), "--out", str(out), "--max-steps", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    assert main([*map(str, common), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra").is_dir()
    assert json.loads((out / "report.json").read_text())["steps"] == 1 and log_steps(out) == [1]


@pytest.mark.parametrize("case", ["equal", "inside", "above", "class_images", "concepts"])
def test_out_overlapping_an_input_is_refused(case, capsys, tmp_path, common, images):
    extra = []
    if case == "equal":
        out, flag = images, "--images"
    elif case == "inside":
        out, flag = images / "run", "--images"
    elif case == "above":
        out, flag = tmp_path, "--images"
    elif case == "class_images":
        out, flag = shutil.copytree(images, tmp_path / "dogs"), "--class-images"
        extra = ["--class-images", out]
    else:
        shutil.copytree(images, tmp_path / "cats")
        concepts = tmp_path / "concepts.json"
        concepts.write_text(json.dumps([{"images": "cats", "token": "<a>", "class_word": "cat"}]))
        out, flag = tmp_path / "cats" / "sub", "--concepts"
        extra = ["--concepts", concepts, "--method", "custom_diffusion"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, line = run_cli(capsys, *common, *extra, "--out", out, "--overwrite")
    assert_one_line(code, line, f"--out {out}", flag)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_two_stage_overwrite_refuses_a_folder_that_holds_no_run(capsys, tmp_path, common):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, line = run_cli(capsys, *common, "--method", "two_stage", "--stage1-steps", 1, "--stage2-steps", 1,
                         "--out", mine, "--overwrite")
    assert_one_line(code, line, "holds no t2i-fast run")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def cd_runs(tiny_model, concept_dir, tmp_path_factory):
    from t2i_fast.testing import write_concept_images

    root = tmp_path_factory.mktemp("cd")
    cat = write_concept_images(root / "cat-images", n=2, size=64, seed=3)  # not the run folder root/cat
    runs = []
    for images, word in ((concept_dir, "dog"), (cat, "cat")):  # as test_merge's: a well-posed merge
        cfg = TrainConfig(model=str(tiny_model), images=str(images), class_word=word, token="<new1>",
                          method="custom_diffusion", out=str(root / word), resolution=32, max_steps=2, lr=3e-2,
                          crop_variants=1, num_samples=0, progress=False, early_stop="none")
        runs.append(train(cfg).out)
    return runs


@pytest.fixture
def cd_run(cd_runs):
    return cd_runs[0]


def test_merge_refuses_an_out_that_is_an_input_or_not_ours(capsys, tmp_path, cd_runs):
    run = shutil.copytree(cd_runs[0], tmp_path / "a")
    before = sorted(p.name for p in run.iterdir())
    code, line = run_cli(capsys, "merge", run, cd_runs[1], "--out", run, "--overwrite")
    assert_one_line(code, line, f"--out {run}", "merge input")
    assert sorted(p.name for p in run.iterdir()) == before
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, line = run_cli(capsys, "merge", run, "--out", mine, "--overwrite")
    assert_one_line(code, line, "holds no t2i-fast run")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# --- divergence

def test_divergence_stops_at_its_step_and_keeps_the_last_good_checkpoint(capsys, tmp_path, common):
    from t2i_fast.formats import read_safetensors

    out = tmp_path / "run"
    code, line = run_cli(capsys, *common, "--out", out, "--max-steps", 5, "--lr", 1e6, "--checkpoint-every", 1)
    assert_one_line(code, line, "diverged at step", "lower --lr")
    step = int(line.split("diverged at step ")[1].split()[0])
    assert not (out / "report.json").exists() and not (out / LORA_FILE).exists()
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert 1 <= state["step"] < step and f"still holds step {state['step']}" in line
    read_safetensors(out / "checkpoint" / "trainable.safetensors")  # finite, or it raises
    assert all(torch.isfinite(torch.tensor(json.loads(x)["loss"]))
               for x in (out / "log.jsonl").read_text().splitlines())


def test_a_weight_that_becomes_infinite_is_caught_before_it_is_saved(capsys, tmp_path, common):
    # lr 1e39 overflows fp32 in the first update while that step's loss (computed before it) is finite:
    # only the check of the weights at the save can see it
    out = tmp_path / "run"
    code, line = run_cli(capsys, *common, "--out", out, "--lr", 1e39, "--max-grad-norm", 0)
    assert_one_line(code, line, "diverged at step 1", "trained weight became NaN or infinite",
                    "no adapter or checkpoint was written", "lower --lr")
    assert not (out / "checkpoint").exists() and not (out / LORA_FILE).exists()
    assert not (out / "report.json").exists()


def poison(path):
    """Write NaN into the first non-empty tensor of a safetensors file, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k, v in tensors.items() if v.numel())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)


def test_sample_export_eval_refuse_a_non_finite_adapter(base_cfg, tiny_model):
    from diffusers import StableDiffusionPipeline

    from t2i_fast.export import export
    from t2i_fast.sampling import load_adapter
    from t2i_fast.toy.evaluator import evaluate_run

    out = train(base_cfg.replace(max_steps=1, train_token=True, early_stop="none")).out
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    poison(out / LORA_FILE)
    for call in (lambda: load_adapter(pipe, out), lambda: load_adapter(pipe, out / LORA_FILE),
                 lambda: export(out, "kohya"), lambda: evaluate_run(out)):
        with pytest.raises(UserError, match=f"{LORA_FILE} holds NaN or infinite values.*lower --lr"):
            call()
    poison(out / TI_FILE)
    with pytest.raises(UserError, match=f"{TI_FILE} holds NaN"):
        export(out, "a1111")


def test_sample_refuses_a_pipeline_folder_with_non_finite_weights(tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    from t2i_fast.sampling import load_adapter

    run = shutil.copytree(tiny_model, tmp_path / "run")
    poison(run / "unet" / "diffusion_pytorch_model.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors holds NaN"):
        load_adapter(pipe, run)


def test_merge_refuses_a_non_finite_run(capsys, tmp_path, cd_run):
    from t2i_fast.cd_files import CD_FILE

    run = shutil.copytree(cd_run, tmp_path / "a")
    poison(run / CD_FILE)
    code, line = run_cli(capsys, "merge", run, "--out", tmp_path / "merged")
    assert_one_line(code, line, f"{CD_FILE} holds NaN")
    assert not (tmp_path / "merged").exists()


# --- kills, signals and interrupts

def test_a_kill_while_the_checkpoint_is_replaced_leaves_one(base_cfg, monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        if os.path.basename(src) == "checkpoint.tmp":
            calls.append(1)
            if len(calls) == 2:  # the step-2 checkpoint is complete; the step-1 one is about to be replaced
                raise Killed
        return real(src, dst)

    cfg = base_cfg.replace(checkpoint_every=1, early_stop="none")
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(os, "replace", real)
    resumed = train(cfg.replace(resume=True))
    assert resumed.steps == 3 and len(resumed.losses) == 3
    assert log_steps(resumed.out) == [1, 2, 3]


def test_resume_drops_the_killed_attempts_log_lines(base_cfg, monkeypatch):
    cfg = base_cfg.replace(checkpoint_every=2, max_steps=4, early_stop="none")
    kill_at_training_step(monkeypatch, 4)  # steps 1-3 are logged, the checkpoint holds step 2
    with pytest.raises(Killed):
        train(cfg)
    out = Path(cfg.out)
    assert log_steps(out) == [1, 2, 3]
    monkeypatch.undo()
    assert train(cfg.replace(resume=True)).steps == 4
    assert log_steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_rerun_into_an_interrupted_run_needs_resume_or_overwrite(base_cfg, monkeypatch, checkpoint_every):
    cfg = base_cfg.replace(checkpoint_every=checkpoint_every, early_stop="none")
    kill_at_training_step(monkeypatch, 3)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    log = Path(cfg.out) / "log.jsonl"
    before = log.read_text()
    advice = ("with a checkpoint; pass --resume to continue it, --overwrite" if checkpoint_every
              else "without a checkpoint; pass --overwrite")
    with pytest.raises(UserError, match=f"holds an interrupted run {advice}"):
        train(cfg)
    assert log.read_text() == before
    assert train(cfg.replace(overwrite=True)).steps == 3


def test_sigterm_saves_a_checkpoint_like_ctrl_c(base_cfg, monkeypatch):
    cfg = base_cfg.replace(early_stop="none", max_steps=4)
    loss, calls = Trainer.loss, []

    def loss_with_sigterm(self, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:  # during step 2, as docker stop or a SLURM preemption might come
                os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, batch)

    def default(signum, frame):  # stands in for SIGTERM's default action, which would end pytest
        raise RuntimeError("SIGTERM reached the default handler: the trainer did not catch it")

    monkeypatch.setattr(Trainer, "loss", loss_with_sigterm)
    outer = signal.signal(signal.SIGTERM, default)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
        assert signal.getsignal(signal.SIGTERM) is default  # the trainer put it back
    finally:
        signal.signal(signal.SIGTERM, outer)
    monkeypatch.undo()
    out = cfg.out
    assert torch.load(f"{out}/checkpoint/state.pt", weights_only=True)["step"] == 2
    assert not os.path.exists(f"{out}/report.json")
    assert train(cfg.replace(resume=True)).steps == 4


def _interrupt_pipelines(monkeypatch):
    from diffusers import StableDiffusionPipeline

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", ctrl_c)


def test_ctrl_c_during_the_sample_grid_says_what_is_missing(base_cfg, monkeypatch, capsys):
    cfg = base_cfg.replace(num_samples=1, sample_steps=1, early_stop="none")
    _interrupt_pipelines(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    err = capsys.readouterr().err
    assert "interrupted while drawing the sample grid" in err and "samples.png and report.json are missing" in err
    assert "--resume" in err
    out = base_cfg.out
    assert os.path.exists(f"{out}/{LORA_FILE}") and not os.path.exists(f"{out}/report.json")
    monkeypatch.undo()
    done = train(cfg.replace(resume=True))  # what the message says makes the missing files
    assert done.steps == 3 and os.path.exists(f"{out}/samples.png") and os.path.exists(f"{out}/report.json")


def test_ctrl_c_during_the_evaluator_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from t2i_fast import app

    if app._toy() is None:
        pytest.skip("the bundled toy model is not installed")
    _interrupt_pipelines(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        app.train(TrainConfig(out=str(out), max_steps=1, num_samples=0, progress=False, early_stop="none"))
    err = capsys.readouterr().err
    assert "interrupted while scoring the run" in err and "eval.json" in err and f"t2i-fast eval {out}" in err
    assert (out / "report.json").is_file() and not (out / "eval.json").exists()


# --- resume must continue what the checkpoint trained

@pytest.mark.parametrize("field,value,flag", [("lr", 1e-2, "--lr"), ("lora_rank", 4, "--lora-rank"),
                                              ("method", "textual_inversion", "--method")])
def test_resume_refuses_changed_training_settings(base_cfg, field, value, flag):
    cfg = base_cfg.replace(max_steps=2, early_stop="none")
    first = train(cfg)
    with pytest.raises(UserError, match=f"--resume: .*checkpoint was trained with .*{flag} .*not .*{flag} "
                                        f".*--overwrite"):
        train(cfg.replace(resume=True, max_steps=3, **{field: value}))
    # bookkeeping may change: a longer budget, another log interval, a sample grid
    resumed = train(cfg.replace(resume=True, max_steps=3, log_every=3, num_samples=1, sample_steps=1))
    assert resumed.steps == 3 and resumed.report["config"]["lr"] == first.report["config"]["lr"]


def test_resume_of_a_checkpoint_older_than_a_field_takes_the_field_as_its_default(base_cfg):
    """A checkpoint written before a setting existed (here --buckets) trained as its default: resuming with the
    default continues, with another value is refused."""
    cfg = base_cfg.replace(max_steps=2, early_stop="none")
    first = train(cfg)
    saved_config = first.out / "checkpoint" / "config.json"
    config = json.loads(saved_config.read_text())
    del config["buckets"]
    saved_config.write_text(json.dumps(config))
    with pytest.raises(UserError, match="trained with --buckets False, not --buckets True"):
        train(cfg.replace(resume=True, max_steps=3, buckets=True))
    assert train(cfg.replace(resume=True, max_steps=3)).steps == 3


def test_resume_from_another_base_model_names_both(base_cfg, tmp_path, capsys):
    from t2i_fast.testing import save_pipeline

    other = save_pipeline("tiny", tmp_path / "other")
    cfg = base_cfg.replace(max_steps=2, early_stop="none")
    train(cfg)
    with pytest.raises(UserError, match="--model") as e:
        train(cfg.replace(model=str(other), resume=True))
    assert str(other) in str(e.value) and base_cfg.model in str(e.value)


@pytest.mark.parametrize("name", ["state.pt", "trainable.safetensors"])
def test_damaged_checkpoint_on_resume_is_one_line(capsys, tmp_path, common, name):
    out = tmp_path / "run"
    assert main([*map(str, common), "--out", str(out), "--max-steps", "2"]) == 0
    path = out / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, line = run_cli(capsys, *common, "--out", out, "--max-steps", 3, "--resume")
    assert_one_line(code, line, f"checkpoint {out / 'checkpoint'} is damaged", "--overwrite")


# --- the output folder: a file, read-only, a full disk

def test_out_that_is_a_file(capsys, tmp_path, common):
    out = tmp_path / "run.txt"
    out.write_text("mine")
    code, line = run_cli(capsys, *common, "--out", out)
    assert_one_line(code, line, f"--out {out}", "is a file")
    assert out.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(capsys, tmp_path, common):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, line = run_cli(capsys, *common, "--out", parent / "run")
        assert_one_line(code, line, str(parent), "not writable")
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
def test_write_error_is_one_line_and_leaves_nothing_half_written(capsys, tmp_path, common, monkeypatch, code):
    real = torch.save

    def failing_save(obj, f, *args, **kwargs):  # half the file is written, then the disk is full (or read-only)
        with open(f, "wb") as fh:
            fh.write(b"\0" * 100)
        raise OSError(code, os.strerror(code), str(f))

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    status, line = run_cli(capsys, *common, "--out", out)
    monkeypatch.setattr(torch, "save", real)
    assert_one_line(status, line, "could not write", "state.pt", os.strerror(code))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "checkpoint").exists() and not (out / "report.json").exists()
    assert not (out / LORA_FILE).exists()
