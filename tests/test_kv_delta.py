"""kernels.kv_delta: Triton kernel (interpreter, fp32) and fused PyTorch path (fp32, bf16) against the
plain twin and an fp64 reference, for one shared delta and for per-sample deltas (several concepts in one
batch), plus the Custom Diffusion K/V projection it replaces.

Tolerances are relative to PyTorch's own error: |ours − fp64| <= 2·|twin − fp64| + floor·max|fp64|.
The interpreter cases run in a TRITON_INTERPRET=1 subprocess (see test_lora_linear.py for why).
"""
from __future__ import annotations


import pytest
import torch

import t2i_fast.kernels as K
from interpreter_runner import IN_INTERPRETER, check_vs_fp64, run_interpreter_cases

NAMES = ["k", "dcontext", "dweight", "ddelta"]


def _inputs(B, Nk, cin, cout, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, sc=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * sc  # noqa: E731
    delta = t(E, cout, cin, sc=0.1 * cin ** -0.5) if E else t(cout, cin, sc=0.1 * cin ** -0.5)
    index = torch.arange(B) % E if E else None
    return dict(context=t(B, Nk, cin), weight=t(cout, cin, sc=cin ** -0.5), delta=delta, index=index,
                dout=t(B, Nk, cout))


def _run(fn, inp, dtype, grad_weight=True):
    c, w, d = (inp[k].detach().to(dtype).clone() for k in ("context", "weight", "delta"))
    wrt = [c.requires_grad_(), w.requires_grad_(grad_weight), d.requires_grad_()]
    out = fn(c, w, d, inp["index"])
    grads = torch.autograd.grad(out, [t for t in wrt if t.requires_grad], inp["dout"].to(dtype))
    return [out] + list(grads)


CASES = [  # (B, Nk, Cin, Cout, E): E = 0 -> one shared 2-D delta. Interpreter tiles: 16 tokens × 32 × 32.
    pytest.param(2, 77, 48, 40, 0, id="B2-Nk77-48to40-shared"),
    pytest.param(3, 77, 40, 80, 2, id="B3-Nk77-40to80-E2"),
    pytest.param(4, 33, 70, 100, 3, id="B4-Nk33-70to100-E3-multiblock"),
]


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreter run")
def test_triton_interpreter():
    run_interpreter_cases(__file__)


_CACHE: dict = {}


@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("B,Nk,cin,cout,E", CASES)
def test_interp_case_fp32(B, Nk, cin, cout, E, which):
    """One test id per output and gradient; each case's kernels run once (cached)."""
    assert K.backend(torch.zeros(1)) == "triton"
    key = (B, Nk, cin, cout, E)
    if key not in _CACHE:
        inp = _inputs(B, Nk, cin, cout, E)
        _CACHE[key] = (_run(K.kv_delta, inp, torch.float32), _run(K.kv_delta_ref, inp, torch.float32),
                       _run(K.kv_delta_ref, inp, torch.float64))
    i = NAMES.index(which)
    ours, twin, gold = (x[i:i + 1] for x in _CACHE[key])
    check_vs_fp64(ours, twin, gold, [which], floor=1e-5)


if not IN_INTERPRETER:  # collected only in test_triton_interpreter's TRITON_INTERPRET=1 subprocess
    del test_interp_case_fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,Nk,cin,cout,E", CASES)
def test_fused_torch(fused_torch, B, Nk, cin, cout, E, dtype):
    inp = _inputs(B, Nk, cin, cout, E)
    # bf16: W + Δ is rounded once to bf16 where the twin rounds two products
    check_vs_fp64(_run(K.kv_delta, inp, dtype), _run(K.kv_delta_ref, inp, dtype), _run(K.kv_delta_ref, inp, torch.float64), NAMES,
          floor=1e-5 if dtype == torch.float32 else 1e-2)


def test_frozen_weight_and_errors(fused_torch):
    inp = _inputs(2, 77, 48, 40, 2)
    ours = _run(K.kv_delta, inp, torch.float32, grad_weight=False)
    twin = _run(K.kv_delta_ref, inp, torch.float32, grad_weight=False)
    assert len(ours) == 3
    for o, t in zip(ours, twin):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        K.kv_delta(inp["context"], inp["weight"], inp["delta"])  # stacked delta without index


def test_per_sample_equals_separate_calls(fused_torch):
    """Serving two concepts in one batch == each sample with its own delta."""
    inp = _inputs(4, 77, 48, 40, 2)
    c, w, d, idx = (inp[k].float() if k != "index" else inp[k] for k in ("context", "weight", "delta", "index"))
    batched = K.kv_delta(c, w, d, idx)
    for b in range(4):
        torch.testing.assert_close(batched[b:b + 1], K.kv_delta(c[b:b + 1], w, d[idx[b]]), rtol=1e-5, atol=1e-5)


def test_against_custom_diffusion_projection(fused_torch):
    """diffusers' Custom Diffusion processor projects context with to_k_custom_diffusion = W + ΔW trained in
    full; kv_delta(context, W, ΔW) gives the same K and the same gradient for the trained weight."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    torch.manual_seed(0)
    proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=40, cross_attention_dim=48)
    base = torch.randn(40, 48) * 0.1
    context = torch.randn(2, 77, 48)
    dout = torch.randn(2, 77, 40)
    k_theirs = proc.to_k_custom_diffusion(context)
    (k_theirs * dout).sum().backward()
    delta = (proc.to_k_custom_diffusion.weight.detach() - base).requires_grad_()
    k_ours = K.kv_delta(context, base, delta)
    (k_ours * dout).sum().backward()
    torch.testing.assert_close(k_ours, k_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.grad, proc.to_k_custom_diffusion.weight.grad, rtol=1e-5, atol=1e-5)
