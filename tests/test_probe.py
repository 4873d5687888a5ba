"""The fixed-batch probe: how its batch is built, determinism, no effect on training, path selection, and
the CUDA-graph path where CUDA exists."""
import pytest
import torch

from t2i_fast.probe import (PROBE_SIZE, LossProbe, build_probe_batch, eval_mode, probe_items, probe_timesteps,
                            select_path)
from t2i_fast import train
from t2i_fast.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def tiny(tiny_model, concept_dir):
    return tiny_model, concept_dir  # conftest: the tiny pipeline, 2 images of 64 px


def cfg(tiny, out, **kw):
    model, imgs = tiny
    base = dict(model=str(model), images=str(imgs), method="lora", resolution=32, out=str(out), overwrite=True,
                num_samples=0, progress=False, lora_rank=4, lr=1e-2, max_steps=6, class_word="dog",
                dvar_window=4, dvar_threshold=0.0)
    base.update(kw)
    return base


# --- selection logic (everywhere)
def test_select_path():
    assert select_path("auto", "cpu", False)[0] == "eager"
    assert select_path("auto", "cpu", True)[0] == "eager"
    assert select_path("graph", "cpu", True)[0] == "eager"
    assert select_path("auto", "cuda", False)[0] == "eager"
    assert select_path("auto", "cuda", True)[0] == "graph"
    assert select_path("eager", "cuda", True) == ("eager", "eager requested")
    with pytest.raises(ValueError):
        select_path("fast", "cuda", True)


def test_capture_failure_falls_back_to_eager(monkeypatch):
    """Where capture raises (dynamic shapes, unsupported ops) the probe runs eagerly and says why."""
    calls = []

    def loss_fn(batch):
        calls.append(1)
        return torch.tensor(0.5)

    probe = LossProbe(loss_fn, None, [], torch.device("cpu"))
    probe.path = "graph"  # as if on CUDA; the CPU has no streams, so capture fails
    assert probe() == 0.5
    assert probe.path == "eager" and "capture failed" in probe.reason and probe.graph is None
    assert probe() == 0.5


def test_probe_items_and_timesteps():
    g = torch.Generator().manual_seed(1)
    items = probe_items(3, 27, 2, g)
    assert [(i, p) for i, _, p in items] == [(0, 0), (1, 1), (2, 2), (0, 3)]
    assert all(0 <= v < 2 for _, v, _ in items)
    t = probe_timesteps(1000, g)
    assert t.shape == (PROBE_SIZE,) and len(set(t.tolist())) == PROBE_SIZE


def test_eval_mode_restores_flags():
    m = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    m.train()
    m[1].eval()
    with eval_mode([m]):
        assert not any(x.training for x in m.modules())
    assert m.training and m[0].training and not m[1].training


# --- determinism and isolation on the tiny model
@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_probe_is_deterministic_and_tracks_parameters(tiny, tmp_path, method):
    tr = Trainer(train_cfg(tiny, tmp_path, method))
    tr.out.mkdir(parents=True, exist_ok=True)
    batches = tr._build_batches()
    batch = build_probe_batch(batches, tr.cfg.seed)
    again = build_probe_batch(batches, tr.cfg.seed)
    for a, b in zip((batch.latents, batch.noise, batch.timesteps), (again.latents, again.noise, again.timesteps)):
        assert torch.equal(a, b)
    assert (batch.text is None) == (method == "textual_inversion")  # TI encodes its prompts each time
    modules = [tr.comps.unet, tr.comps.text_encoder]
    probe = LossProbe(tr.loss, batch, modules, tr.device)
    assert probe.path == "eager"
    state = torch.get_rng_state()
    v1, v2 = probe(), probe()
    assert v1 == v2  # bit for bit
    assert torch.equal(state, torch.get_rng_state())  # the global stream is untouched
    assert LossProbe(tr.loss, again, modules, tr.device)() == v1
    if method == "textual_inversion":
        return  # the tiny random text encoder barely sees its token (1e-6 change in features): LoRA checks this
    with torch.no_grad():
        p = tr.method.parameters()[-1]
        p.add_(0.1)
    v3 = probe()
    assert v3 != v1
    with torch.no_grad():
        p.sub_(0.1)
    assert abs(probe() - v1) < 1e-5


def train_cfg(tiny, out, method):
    from t2i_fast.config import TrainConfig

    extra = dict(lr=5e-3) if method == "textual_inversion" else {}
    return TrainConfig(**{**cfg(tiny, out, method=method), **extra})


@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_probe_on_off_leaves_training_bit_identical(tiny, tmp_path, method):
    lr = 5e-3 if method == "textual_inversion" else 1e-2
    # LoRA's A is initialised from the global RNG when the Trainer is built (before the run seeds it)
    torch.manual_seed(0)
    on = train(**cfg(tiny, tmp_path / "on", method=method, lr=lr, early_stop="dvar", probe_every=1))
    torch.manual_seed(0)
    off = train(**cfg(tiny, tmp_path / "off", method=method, lr=lr, early_stop="none"))
    assert on.steps == off.steps == 6
    assert on.report["early_stop"]["probe_calls"] == 6
    assert on.losses == off.losses
    from safetensors.torch import load_file

    a = load_file(tmp_path / "on" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "off" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the CUDA-graph path (GPU tier)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_probe_matches_eager_and_sees_updates(tiny, tmp_path):
    tr = Trainer(train_cfg(tiny, tmp_path, "lora").replace(device="cuda", mixed_precision="no"))
    tr.out.mkdir(parents=True, exist_ok=True)
    batch = build_probe_batch(tr._build_batches(), 0)
    probe = LossProbe(tr.loss, batch, [tr.comps.unet], tr.device)
    assert probe.path == "graph"
    g1 = probe()
    assert probe.graph is not None, probe.reason
    e1 = probe.eager().item()
    assert g1 == pytest.approx(e1, rel=1e-4)
    with torch.no_grad():  # an in-place update, as the optimizer does: the graph must see it
        for p in tr.method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g2, e2 = probe(), probe.eager().item()
    assert g2 != g1 and g2 == pytest.approx(e2, rel=1e-4)
    assert probe.device_time() > 0
