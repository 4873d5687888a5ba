"""End to end on the tiny model: DVAR stops a run before its cap, the report and plot agree with it, a
sparse probe stops where replaying the every-step trace says, and the baselines (none, few) behave.

Measured on this tiny random model (LoRA rank 8, lr 1e-2, 2 images, 32 px): L_det falls from ~1.14 to a
plateau near 0.63 by step ~150; with N = 20, alpha = 0.1 the every-step criterion stops at step ~53 (r falls
from ~0.5 to 0.1 over steps 30-53), less than half the cap of 120: the margin this test relies on.
"""
import json

import pytest
import torch

from t2i_fast.stopping import replay
from t2i_fast import train

CAP, WINDOW, ALPHA = 120, 20, 0.1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def tiny(tiny_model, concept_dir):
    return tiny_model, concept_dir  # conftest: the tiny pipeline, 2 images of 64 px


def run(tiny, out, **kw):
    model, imgs = tiny
    torch.manual_seed(0)  # LoRA's A is drawn from the global RNG when the Trainer is built
    base = dict(model=str(model), images=str(imgs), method="lora", resolution=32, out=str(out),
                overwrite=True, num_samples=0, progress=False, lora_rank=8, lr=1e-2, max_steps=CAP,
                class_word="dog", dvar_window=WINDOW, dvar_threshold=ALPHA, probe_every=1)
    base.update(kw)
    return train(**base)


@pytest.fixture(scope="module")
def dense(tiny, tmp_path_factory):
    return run(tiny, tmp_path_factory.mktemp("dense") / "run", save_best=True)


def test_dvar_stops_before_the_cap_and_reports_it(dense):
    rep = json.loads((dense.out / "report.json").read_text())
    es = rep["early_stop"]
    assert es["stopped_early"] and es["stop_step"] == dense.steps == rep["steps"]
    assert WINDOW <= dense.steps < CAP
    assert es["cap"] == CAP and es["threshold"] == ALPHA and es["window_values"] == WINDOW
    assert es["r_at_stop"] < ALPHA
    steps = [s for s, _ in es["l_det"]]
    assert steps == list(range(dense.steps + 1))  # one value per step, the last at the stop step
    assert es["r"][-1] == [dense.steps, es["r_at_stop"]]
    assert all(r >= ALPHA for _, r in es["r"][:-1])  # it stopped at the first crossing
    trace = [v for _, v in es["l_det"]]
    assert replay(trace, WINDOW, ALPHA)[0] == dense.steps
    assert trace[-1] < trace[0]  # the concept was being learned
    assert es["probe_calls"] == dense.steps + 1 and 0 < es["probe_fraction"] < 1
    assert es["probe_path"] == "eager"
    assert len(dense.losses) == dense.steps
    # the plot and the best adapter
    png = dense.out / "dvar.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dvar.png" in rep["files"]
    assert es["best_step"] is not None and es["best_l_det"] == min(trace)
    assert (dense.out / "best" / "pytorch_lora_weights.safetensors").is_file()


def test_sparse_probe_stops_where_the_replay_says(tiny, dense, tmp_path):
    # the every-step trace past the dense stop (threshold 0 never stops): the sparse rule may fire later
    budget = dense.steps + 15
    full = run(tiny, tmp_path / "full", probe_every=1, dvar_threshold=0.0, max_steps=budget)
    trace = [v for _, v in full.report["early_stop"]["l_det"]]
    assert trace[: dense.steps + 1] == [v for _, v in dense.report["early_stop"]["l_det"]]
    expected, _ = replay(trace, WINDOW, ALPHA, every=2)
    assert expected is not None, "the sparse criterion should fire within 15 steps of the dense one"
    sparse = run(tiny, tmp_path / "sparse", probe_every=2, max_steps=budget)
    es = sparse.report["early_stop"]
    assert es["window_values"] == WINDOW // 2 and es["probe_every"] == 2
    assert sparse.steps == expected  # training is bit-identical, so the sparse values are the dense ones
    assert [v for _, v in es["l_det"]] == trace[: expected + 1: 2]
    assert abs(sparse.steps - dense.steps) <= 0.1 * dense.steps


def test_baselines(tiny, tmp_path):
    few = run(tiny, tmp_path / "few", early_stop="few", few_steps=4, lr_schedule="linear", log_every=1)
    assert few.steps == 4 and few.report["early_stop"]["stop_step"] == 4
    # a decaying schedule spans the fixed budget, not the cap: linear to 0 over 4 steps
    lrs = [json.loads(line)["lr"] for line in (few.out / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-2 * f for f in (0.75, 0.5, 0.25, 0.0)])
    assert "probe_calls" not in few.report["early_stop"] and not (few.out / "dvar.png").exists()
    full = run(tiny, tmp_path / "none", early_stop="none", max_steps=5)
    assert full.steps == 5 and not full.report["early_stop"]["stopped_early"]


def test_resume_continues_the_criterion(tiny, dense, tmp_path):
    # a run cut at step 30 and resumed must stop where the uninterrupted run stopped, with the same history
    out = tmp_path / "resumed"
    run(tiny, out, max_steps=30)
    resumed = run(tiny, out, resume=True, overwrite=False)
    es, ref = resumed.report["early_stop"], dense.report["early_stop"]
    assert resumed.steps == dense.steps
    assert es["l_det"] == ref["l_det"]


def test_ctrl_c_then_resume_is_exact_and_keeps_the_best_adapter(tiny, dense, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a training step: the step finishes and a checkpoint is saved at that step
    boundary, holding the best adapter so far; --resume then ends where an uninterrupted run ends."""
    import os
    import signal

    from safetensors.torch import load_file

    from t2i_fast.trainer import Trainer

    def same_files(a_dir, b_dir, name):
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{name} {k}")

    loss, training_calls = Trainer.loss, []

    def loss_with_ctrl_c(self, batch):
        if torch.is_grad_enabled():  # a training step's loss, not the probe's
            training_calls.append(1)
            if len(training_calls) == 3:  # after step 3's batch is drawn, as a user's Ctrl-C might come
                os.kill(os.getpid(), signal.SIGINT)
        return loss(self, batch)

    out = tmp_path / "cut"
    monkeypatch.setattr(Trainer, "loss", loss_with_ctrl_c)
    # as in an interactive terminal (a test run in the background may have SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tiny, out, save_best=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer put it back
    finally:
        signal.signal(signal.SIGINT, outer)
    monkeypatch.setattr(Trainer, "loss", loss)
    assert not (out / "best").exists()  # an interrupted run has written only its checkpoint

    # the checkpoint is at the end of step 3 and holds the best adapter so far: resuming with a cap of 3
    # trains nothing and writes what a straight 3-step run writes
    straight3 = run(tiny, tmp_path / "straight3", save_best=True, max_steps=3)
    at3 = run(tiny, out, save_best=True, max_steps=3, resume=True, overwrite=False)
    assert at3.steps == 3 and at3.report["early_stop"]["best_step"] == straight3.report["early_stop"]["best_step"]
    for name in ("pytorch_lora_weights.safetensors", "best/pytorch_lora_weights.safetensors"):
        same_files(straight3.out, at3.out, name)

    # and continuing to the cap stops where the uninterrupted run stopped, with the same history
    resumed = run(tiny, out, save_best=True, resume=True, overwrite=False)
    es, ref = resumed.report["early_stop"], dense.report["early_stop"]
    assert resumed.steps == dense.steps and es["l_det"] == ref["l_det"] and es["best_step"] == ref["best_step"]
    for name in ("pytorch_lora_weights.safetensors", "best/pytorch_lora_weights.safetensors"):
        same_files(dense.out, resumed.out, name)


def test_ctrl_c_handler_leaves_an_ignored_sigint_alone():
    import signal

    from t2i_fast.trainer import DeferredInterrupt

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        DeferredInterrupt().restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt = DeferredInterrupt()
        assert signal.getsignal(signal.SIGINT) == interrupt._handle
        interrupt.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
