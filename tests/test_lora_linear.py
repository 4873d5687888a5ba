"""kernels.lora_linear: Triton kernel (interpreter, fp32) and fused PyTorch path (fp32, bf16) against the
plain twin, an fp64 reference, and peft's LoRA Linear with shared weights.

Tolerances are relative to PyTorch's own error: |ours − fp64| <= 2·|twin − fp64| + a small floor.
The interpreter cases need TRITON_INTERPRET=1 set before Triton is first imported (Triton's own library
functions are decorated at import), so test_triton_interpreter reruns them in a fresh subprocess.
"""
from __future__ import annotations

import sys

import pytest
import torch

import t2i_fast.kernels as K
from interpreter_runner import IN_INTERPRETER, check_vs_fp64, run_interpreter_cases

LL = sys.modules["t2i_fast.kernels.lora_linear"]
NAMES = ["y", "dx", "dW", "db", "dA", "dB"]


def _inputs(lead, n_in, n_out, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)  # noqa: E731
    return dict(x=t(*lead, n_in), weight=t(n_out, n_in, sc=n_in ** -0.5), bias=t(n_out),
                lora_a=t(r, n_in, sc=n_in ** -0.5), lora_b=t(n_out, r, sc=0.5), dy=t(*lead, n_out))


def _run(fn, inp, dtype, scale, grad_weight=True):
    args = {k: v.detach().to(dtype).clone().requires_grad_(k != "dy" and (grad_weight or k not in ("weight", "bias")))
            for k, v in inp.items()}
    y = fn(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], scale)
    wrt = [args[k] for k in ("x", "weight", "bias", "lora_a", "lora_b") if args[k].requires_grad]
    grads = torch.autograd.grad(y, wrt, args["dy"])
    return [y] + list(grads)


TRITON_CASES = [  # (lead dims, in, out, r) — the last spans >1 32-wide tile in M, N and K
    pytest.param((2, 37), 40, 24, 4, id="B2xN37-40to24-r4"),
    pytest.param((77,), 80, 40, 8, id="M77-80to40-r8"),
    pytest.param((3, 33), 70, 100, 20, id="M99-70to100-r20-multiblock"),
]




@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreter run")
def test_triton_interpreter():
    run_interpreter_cases(__file__)


_CACHE: dict = {}


@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("lead,n_in,n_out,r", TRITON_CASES)
def test_interp_case_fp32(lead, n_in, n_out, r, which):
    """One test id per output and gradient; each case's kernels run once (cached)."""
    assert K.backend(torch.zeros(1)) == "triton"
    key = (lead, n_in, n_out, r)
    if key not in _CACHE:
        inp = _inputs(lead, n_in, n_out, r, torch.float32)
        _CACHE[key] = (_run(K.lora_linear, inp, torch.float32, 0.75), _run(K.lora_linear_ref, inp, torch.float32, 0.75),
                       _run(K.lora_linear_ref, inp, torch.float64, 0.75))
    i = NAMES.index(which)
    ours, twin, gold = (x[i:i + 1] for x in _CACHE[key])
    check_vs_fp64(ours, twin, gold, [which], floor=1e-5)


if not IN_INTERPRETER:  # collected only in test_triton_interpreter's TRITON_INTERPRET=1 subprocess
    del test_interp_case_fp32


TORCH_CASES = [
    pytest.param((2, 37), 40, 24, 4, id="B2xN37-40to24-r4"),
    pytest.param((4, 64), 320, 320, 4, id="M256-320to320-r4"),
    pytest.param((1000,), 64, 96, 16, id="M1000-64to96-r16"),
    pytest.param((3, 1001), 320, 200, 8, id="M3003-320to200-r8-rowchunks"),  # several row chunks, ragged last
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,n_in,n_out,r", TORCH_CASES)
def test_fused_torch(fused_torch, lead, n_in, n_out, r, dtype):
    inp = _inputs(lead, n_in, n_out, r, dtype)
    gold = _run(K.lora_linear_ref, inp, torch.float64, 2.0)
    twin = _run(K.lora_linear_ref, inp, dtype, 2.0)
    ours = _run(K.lora_linear, inp, dtype, 2.0)
    # bf16: the merged weight W + sBA is rounded once to bf16, the twin rounds two products separately
    check_vs_fp64(ours, twin, gold, NAMES, floor=1e-5 if dtype == torch.float32 else 4e-3)


def test_frozen_weight_gets_no_grad(fused_torch):
    inp = _inputs((5, 7), 16, 12, 2, torch.float32)
    ours = _run(K.lora_linear, inp, torch.float32, 1.0, grad_weight=False)
    twin = _run(K.lora_linear_ref, inp, torch.float32, 1.0, grad_weight=False)
    assert len(ours) == 4
    for o, t in zip(ours, twin):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)


def test_row_chunks_cover_the_case():
    """The M3003 case above runs several row chunks with a shorter last one, in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        rows = LL._chunk_rows(torch.zeros(3003, 320, dtype=dtype))
        assert rows < 3003 and 3003 % rows != 0


def test_input_without_grad(fused_torch):
    """x not requiring grad (first layer, frozen encoder output): no dx, LoRA grads still exact."""
    inp = _inputs((700,), 320, 64, 4, torch.float32)
    args = {k: v.float().requires_grad_(k in ("lora_a", "lora_b")) for k, v in inp.items()}
    grads = []
    for fn in (K.lora_linear, K.lora_linear_ref):
        y = fn(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 0.5)
        grads.append(torch.autograd.grad(y, [args["lora_a"], args["lora_b"]], args["dy"]))
    for o, t in zip(*grads):  # sums over 700 rows in fp32, in a different order
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-4)


def test_no_bias_and_kernels_off(monkeypatch):
    inp = _inputs((9,), 16, 8, 2, torch.float32)
    x, w, a, b = (inp[k].float() for k in ("x", "weight", "lora_a", "lora_b"))
    monkeypatch.setenv("T2I_FAST_KERNELS", "0")
    assert K.backend(x) == "ref"
    off = K.lora_linear(x, w, None, a, b, 0.5)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    on = K.lora_linear(x, w, None, a, b, 0.5)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_against_peft_lora_linear(fused_torch, dtype):
    """Shared weights: peft's lora.Linear and t2i_fast's LoRALinear give the same outputs and LoRA grads."""
    peft = pytest.importorskip("peft")
    from t2i_fast.nn.lora import LoRALinear

    torch.manual_seed(0)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(48, 40)

    model = peft.get_peft_model(Wrap(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    ours = LoRALinear(torch.nn.Linear(48, 40), rank=4, alpha=8)
    with torch.no_grad():
        ours.base.weight.copy_(layer.base_layer.weight)
        ours.base.bias.copy_(layer.base_layer.bias)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    model.to(dtype)
    ours.to(dtype)
    x = torch.randn(3, 50, 48, dtype=dtype)
    dy = torch.randn(3, 50, 40, dtype=dtype)
    y_peft, y_ours = layer(x), ours(x)
    (y_peft * dy).sum().backward()
    (y_ours * dy).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y_ours, y_peft, **tol)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad, **tol)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad, **tol)
    torch.testing.assert_close(ours.merged_weight(), layer.base_layer.weight + 2.0 * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight), **tol)


@pytest.mark.parametrize("path", ["fused", "ref"])
def test_fp32_input_bf16_weight_under_autocast(monkeypatch, path):
    """The GPU default's situation (bf16 frozen weights, autocast, an fp32 LayerNorm output and fp32 LoRA
    factors), here with CPU autocast: the layer computes in the autocast dtype as F.linear does, and every
    gradient comes back in its argument's own dtype."""
    from t2i_fast.nn.lora import LoRALinear

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1" if path == "fused" else "0")
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        # what diffusers' own layers would compute: F.linear on the merged weight, under the same autocast
        w = base.weight.float() + layer.scale * (layer.lora_B @ layer.lora_A)
        expected = torch.nn.functional.linear(x.detach(), w.detach(), base.bias.float())
    assert y.dtype == torch.bfloat16 and expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_A.grad).all() and layer.lora_B.grad.abs().sum() > 0


def test_small_inputs_take_the_twin_on_the_torch_path(monkeypatch):
    """Below SMALL_INPUT elements of x the PyTorch path runs the twin (faster there); above it, the fused
    Function. Both give the same result."""
    import importlib

    op = importlib.import_module("t2i_fast.kernels.lora_linear")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1")
    calls = []
    real = op._LoRALinear.apply
    monkeypatch.setattr(op._LoRALinear, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    w, a, b = torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    small = torch.randn(op.SMALL_INPUT // 32 - 1, 32)
    large = torch.randn(op.SMALL_INPUT // 32 + 1, 32)
    for x in (small, large):
        torch.testing.assert_close(op.lora_linear(x, w, None, a, b, 0.5), op.lora_linear_ref(x, w, None, a, b, 0.5))
    assert calls == [large.shape]
    # few rows for a large layer (cross-attention K/V on 77 text tokens, 2048 -> 512): the twin, though x is
    # above SMALL_INPUT; the same layer on as many rows as its size: the Function
    w, a, b = torch.randn(512, 2048), torch.randn(4, 2048), torch.randn(512, 4)
    few, many = torch.randn(1, 77, 2048), torch.randn(1, 512, 2048)
    assert few.numel() > op.SMALL_INPUT
    calls.clear()
    for x in (few, many):
        torch.testing.assert_close(op.lora_linear(x, w, None, a, b, 0.5), op.lora_linear_ref(x, w, None, a, b, 0.5),
                                   rtol=1e-4, atol=1e-3)  # sums of 2048 products of size ~1: fp32 rounding
    assert calls == [(512, 2048)]
