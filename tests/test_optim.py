"""Optimizer factory and AdamW8bit: state size, save/load/resume, loss curves against fp32 AdamW,
non-finite gradients. Runs on whichever CPU backend is present (native op, or the twin when the
extension is not built); test_native_adamw8bit.py checks that the two agree bit for bit."""
from __future__ import annotations

import io
import math

import pytest
import torch

from t2i_fast import optim
from t2i_fast.optim import AdamW8bit, build_optimizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster and steadier


# ---------------------------------------------------------------------------------------------------------
# factory


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_build_every_optimizer_and_step(name):
    p = torch.nn.Parameter(torch.randn(5000))
    opt = build_optimizer(name, [p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    assert isinstance(opt, torch.optim.Optimizer)
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert (p < before).all()
    if name.endswith("adamw8bit"):
        assert isinstance(opt, AdamW8bit)


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam9bit", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(ValueError, match="nonfinite"):
        build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3, nonfinite="ignore")


def test_guarded_torch_optimizer_works_with_lr_scheduler():
    p = torch.nn.Parameter(torch.ones(10))
    opt = build_optimizer("adamw", [p], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    p.grad = torch.ones(10)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [5e-3]


# ---------------------------------------------------------------------------------------------------------
# state size, save / load / resume


def test_state_is_about_two_bytes_per_param():
    params = [torch.nn.Parameter(torch.zeros(1280, 768)), torch.nn.Parameter(torch.zeros(640, 768))]
    opt = AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in params)
    measured = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
    assert measured == opt.state_bytes()
    assert measured / n == pytest.approx(2 + 2 * 4 / 256)  # two uint8 codes + two fp32 absmax per 256
    assert measured / n <= 2.1
    for st in opt.state.values():
        assert st["state1"].dtype == st["state2"].dtype == torch.uint8
        assert st["absmax1"].dtype == torch.float32


def test_small_tensors_keep_fp32_state():
    p = torch.nn.Parameter(torch.zeros(4095))
    q = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamW8bit([p, q], lr=1e-3)
    p.grad, q.grad = torch.ones(4095), torch.ones(4096)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.float32 and "absmax1" not in opt.state[p]
    assert opt.state[q]["state1"].dtype == torch.uint8 and opt.state[q]["absmax1"].numel() == 16


def _train(opt_factory, steps, params0, seed=0, state=None):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = opt_factory(params)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_save_load_resume_continues_identically(backend):
    gen = torch.Generator().manual_seed(0)
    params0 = [torch.randn(300, 77, generator=gen), torch.randn(50, generator=gen)]
    factory = lambda ps: AdamW8bit([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], lr=1e-2,  # noqa: E731
                                   weight_decay=0.1, backend=backend)
    straight, _ = _train(factory, 6, params0, seed=1)
    first, opt = _train(factory, 3, params0, seed=1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["state"][0]["state1"].dtype == torch.uint8  # not cast to the param dtype on load
    # continue from the saved weights and optimizer state with the rest of the same gradient stream
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params0:
            torch.randn(p.shape, generator=gen)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = factory(resumed)
    opt2.load_state_dict(state)
    assert opt2.state[resumed[0]]["absmax1"].dtype == torch.float32
    for _ in range(3):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=gen)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_state_moves_between_backends_and_dtypes():
    """A checkpoint written by one backend continues on another, and bf16 params keep fp32 absmax."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(9000, generator=gen).bfloat16())
    opt = AdamW8bit([p], lr=1e-3, backend="auto")
    p.grad = torch.randn(9000, generator=gen).bfloat16()
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW8bit([q], lr=1e-3, backend="ref")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["absmax1"].dtype == torch.float32 and opt2.state[q]["step"] == 1
    g = torch.randn(9000, generator=gen).bfloat16()
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_loads_state_written_by_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    ref = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn(5000, generator=gen)
    ref.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = AdamW8bit([q], lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[q]
    assert st["state1"].dtype == torch.uint8 and st["absmax1"].numel() == math.ceil(5000 / 256)
    assert "qmap1" not in st
    # the same m/v values, read through either's map (both maps are create_dynamic_map)
    m_bnb = ref.state[p]["qmap1"][ref.state[p]["state1"].long()]
    m_ours = optim.quant_tables()[0][0][st["state1"].long()]
    assert torch.equal(m_bnb, m_ours)


def test_load_rejects_mismatched_state():
    p = torch.nn.Parameter(torch.zeros(5000))
    opt = AdamW8bit([p], lr=1e-3)
    p.grad = torch.ones(5000)
    opt.step()
    q = torch.nn.Parameter(torch.zeros(6000))
    with pytest.raises(ValueError, match="does not fit"):
        AdamW8bit([q], lr=1e-3).load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------------------------------------
# loss curves against fp32 AdamW


def _fit(model, x, y, opt, steps) -> list[float]:
    """Full-batch MSE regression of model(x) onto y; the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _regression(opt_name, steps=150, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(512, 64)
    w_true = torch.randn(64, 96) / 8
    y = torch.tanh(x @ w_true) + 0.01 * torch.randn(512, 96)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96))
    opt = build_optimizer(opt_name, model.parameters(), lr=3e-3, weight_decay=1e-2)
    return _fit(model, x, y, opt, steps)


def test_regression_loss_curve_within_band_of_fp32_adamw():
    """Band: after the first 10 steps every loss within 10% of fp32 AdamW's, final within 5%; both fall
    by more than 5x."""
    ref = _regression("adamw")
    q8 = _regression("adamw8bit")
    assert ref[-1] < ref[0] / 5 and q8[-1] < q8[0] / 5
    for a, b in zip(ref[10:], q8[10:]):
        assert abs(a - b) <= 0.10 * a, (a, b)
    assert abs(ref[-1] - q8[-1]) <= 0.05 * ref[-1]


class _LoRA(torch.nn.Module):
    """y = x Wᵀ + b + (x Aᵀ) Bᵀ with W, b frozen (t2i_fast.nn.lora.LoRALinear's math, in plain torch so the
    test does not depend on the kernels' CPU speed)."""

    def __init__(self, d_in, d_out, rank=8):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, d_in) / d_in ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


def _lora_model(seed=0):
    torch.manual_seed(seed)
    layers = []
    for d_in, d_out in [(320, 640), (640, 1280), (1280, 320)]:
        layers += [_LoRA(d_in, d_out), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


def _lora_losses(opt_name, steps=60):
    model = _lora_model()
    teacher = _lora_model(seed=1)
    torch.manual_seed(2)
    x = torch.randn(64, 320)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        y = teacher(x)
    params = [p for p in model.parameters() if p.requires_grad]
    # lora_A of the 1280-wide layer has 10240 elements: a mix of 8-bit and fp32 state
    opt = build_optimizer(opt_name, params, lr=1e-2, weight_decay=0.0)
    return _fit(model, x, y, opt, steps), opt


def test_lora_layers_loss_curve_within_band_of_fp32_adamw():
    """LoRA layers (SD widths, rank 8) fit a perturbed teacher: every loss within 10% of fp32 AdamW's, the
    mean relative difference under 2%, and the loss falls by more than 30%."""
    ref, _ = _lora_losses("adamw")
    q8, opt = _lora_losses("adamw8bit")
    assert any(st["state1"].dtype == torch.uint8 for st in opt.state.values())
    assert q8[-1] < 0.7 * q8[0]
    rel = [abs(a - b) / a for a, b in zip(ref, q8)]
    assert max(rel) <= 0.10 and sum(rel) / len(rel) <= 0.02, rel


@pytest.mark.slow
def test_tiny_model_lora_training_within_band_of_fp32_adamw(base_cfg, tmp_path):
    """The trainer on the tiny SD model: the adamw8bit loss curve stays within a band of fp32 AdamW's
    (mean relative difference < 5%, every step < 25%) with the same batches."""
    from t2i_fast import train

    cfg = base_cfg.replace(method="lora", lr=1e-2, max_steps=30)
    ref = train(cfg.replace(optimizer="adamw", out=str(tmp_path / "fp32"))).losses
    q8 = train(cfg.replace(optimizer="adamw8bit", out=str(tmp_path / "q8"))).losses
    assert len(ref) == len(q8) == 30
    rel = [abs(a - b) / a for a, b in zip(ref, q8)]
    assert sum(rel) / len(rel) < 0.05 and max(rel) < 0.25, rel


@pytest.mark.slow
def test_tiny_model_adamw8bit_resume_continues_identically(base_cfg, tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from t2i_fast import train
    from t2i_fast.formats import LORA_FILE

    cfg = base_cfg.replace(method="lora", lr=1e-2, optimizer="adamw8bit")
    straight = train(cfg.replace(max_steps=8, out=str(tmp_path / "straight")))
    train(cfg.replace(max_steps=4, out=str(tmp_path / "split")))
    resumed = train(cfg.replace(max_steps=8, out=str(tmp_path / "split"), resume=True))
    a, b = load_file(straight.out / LORA_FILE), load_file(resumed.out / LORA_FILE)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(straight.losses, resumed.losses, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# non-finite gradients


def _poisoned(value, name="adamw8bit", nonfinite="skip"):
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(100))]
    opt = build_optimizer(name, params, lr=1e-2, nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # a clean step first, so there is state to protect
    before = [p.detach().clone() for p in params]
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
             for k, v in opt.state[params[0]].items()}
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[7] = value
    return opt, params, before, state


@pytest.mark.parametrize("name", ["adamw8bit", "adamw", "sgd"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_skips_the_step(name, value):
    opt, params, before, state = _poisoned(value, name)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for k, v in state.items():
        now = opt.state[params[0]][k]
        assert (torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v), k
    # the next clean step goes through
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_nonfinite_gradient_raises_when_asked(name):
    opt, params, before, _ = _poisoned(math.nan, name, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
