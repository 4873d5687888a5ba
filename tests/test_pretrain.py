"""The toy pretraining script on a miniature budget: deterministic, and a run interrupted mid-stage then
resumed writes the same bytes as an uninterrupted one."""
import hashlib

import pytest

from t2i_fast.toy import pretrain as P

MINI = dict(n_images=48, vae_steps=3, vae_batch=4, vae_refine_steps=2, unet_steps=4, unet_batch=4,
            unet_refine_steps=2, unet_refine2_steps=2, warmup=1, encoder_steps=2, ckpt_every=2)


def test_mini_budget_covers_every_step_count():
    # a stage added to pretrain with a real-sized default must get a miniature one here too
    assert {k for k in P.DEFAULTS if k.endswith(("_steps", "_images", "_batch"))} <= set(MINI)


def digest(folder):
    """sha256 of every weight file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture
def small_encoder_pool(monkeypatch):
    # the evaluator encoder's pool of rendered objects is 3000 x 4 views by default: a few suffice here
    from t2i_fast.toy import encoder

    real = encoder.train_encoder
    monkeypatch.setattr(encoder, "train_encoder", lambda *a, **k: real(*a, **k, batch=4, n_objects=8))


def test_pretrain_is_deterministic_and_resumes_bit_exactly(tmp_path, monkeypatch, one_thread, small_encoder_pool):
    first = P.pretrain(tmp_path / "a" / "work", tmp_path / "a" / "model", **MINI)
    second = P.pretrain(tmp_path / "b" / "work", tmp_path / "b" / "model", **MINI)
    reference = digest(tmp_path / "a")
    assert len(reference) == 4  # vae, text encoder, unet and the evaluator encoder
    assert digest(tmp_path / "b") == reference
    assert (first / "model_index.json").read_text() == (second / "model_index.json").read_text()

    # interrupt the UNet stage after its first checkpoint (step 2 of 4), then resume
    calls = {"n": 0}
    real_lr_at = P.lr_at

    def interrupting_lr_at(step, total, *a, **k):
        calls["n"] += 1
        if total == MINI["unet_steps"] and step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, total, *a, **k)

    monkeypatch.setattr(P, "lr_at", interrupting_lr_at)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(tmp_path / "c" / "work", tmp_path / "c" / "model", **MINI)
    assert not (tmp_path / "c" / "model").exists() and not (tmp_path / "c" / "work" / "unet.done").exists()
    monkeypatch.setattr(P, "lr_at", real_lr_at)
    P.pretrain(tmp_path / "c" / "work", tmp_path / "c" / "model", resume=True, **MINI)
    assert digest(tmp_path / "c") == reference
