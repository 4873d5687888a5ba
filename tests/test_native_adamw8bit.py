"""The native op t2i_fast::adamw8bit_step against its PyTorch twin, and the loader around it.

Equality is bit for bit: the kernel and the twin run the same fp32 operations in the same order (the
kernel is built with -ffp-contract=off), share the quantization tables, and the twin takes its sqrt in
fp64 to get the correctly rounded fp32 sqrt that the kernel's sqrtf returns.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from t2i_fast import native, optim

needs_native = pytest.mark.skipif(not native.load(), reason="t2i_fast._C not built")

SHAPES = {
    "3x5_fp32state": (3, 5),
    "1000_fp32state": (1000,),
    "4095_fp32state": (4095,),
    "4096_exactly_16_blocks": (4096,),
    "300x77_odd_tail": (300, 77),
    "77x1000_odd": (77, 1000),
    "1280x768_large": (1280, 768),
}


def _states(shape, dtype, steps, seed=0, min_8bit_size=4096):
    """Two optimizers (native, twin) over identical params after `steps` identical steps."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [(torch.randn(shape, generator=gen) * 10.0 ** (i % 5 - 3)).to(dtype) for i in range(steps)]
    out = []
    for backend in ("native", "ref"):
        p = p0.clone()
        opt = optim.AdamW8bit([p], lr=1e-2, weight_decay=0.1, backend=backend, min_8bit_size=min_8bit_size)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append((p, opt.state[p]))
    return out


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_native_equals_twin_bitwise(shape, dtype):
    (pa, sa), (pb, sb) = _states(shape, dtype, steps=4)
    assert torch.equal(pa, pb)
    assert set(sa) == set(sb)
    for k in sa:
        if k != "step":
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    n = math.prod(shape)
    assert (sa["state1"].dtype == torch.uint8) == (n >= 4096)


@needs_native
def test_many_tensors_one_call_and_zero_grads():
    """A mixed list (fp32 and 8-bit state, all-zero gradient blocks) in one call equals the twin."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(5000,), (17,), (256, 3), (9000,), (64, 64)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for backend in ("native", "ref"):
        qs = [p.clone() for p in ps]
        opt = optim.AdamW8bit(qs, lr=1e-3, backend=backend)
        for i in range(3):
            for j, q in enumerate(qs):
                g = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 * i + j))
                if j == 3:
                    g[:2048] = 0  # whole blocks of zeros: absmax 0, codes on the map's zero
                q.grad = g
            opt.step()
        runs.append((qs, opt))
    (qa, oa), (qb, ob) = runs
    for a, b in zip(qa, qb):
        assert torch.equal(a, b)
        for k in oa.state[a]:
            if k != "step":
                assert torch.equal(oa.state[a][k], ob.state[b][k])
    assert oa.state[qa[3]]["absmax1"][:8].eq(0).all()


def test_quant_maps_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(optim.create_dynamic_map(True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(optim.create_dynamic_map(False), bnbf.create_dynamic_map(signed=False))


@pytest.mark.parametrize("signed", [True, False], ids=["signed_m", "unsigned_v"])
def test_quantizer_is_nearest_entry(signed):
    """The arithmetic quantizer picks the nearest map entry except within rounding of a midpoint."""
    qmaps, qconst = optim.quant_tables()
    q = qmaps[0 if signed else 1]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(200_000, generator=gen) ** 3, 10 ** (-8 * torch.rand(100_000, generator=gen)),
                   torch.tensor([0.0, 1.0, 1e-30]), q])
    if signed:
        x = torch.cat([x, -x])
    codes = optim.quantize_ref(x, qconst[0 if signed else 1], signed).long()
    mids = torch.cat([(q[:-1] + q[1:]) / 2, torch.tensor([math.inf])])
    nearest = torch.searchsorted(mids, x)
    extra = (q[codes] - x).abs() - (q[nearest] - x).abs()
    assert (codes - nearest).abs().max() <= 1
    assert (codes != nearest).float().mean() < 1e-3
    assert extra.max() <= 1e-7
    # every map entry quantizes to itself
    assert torch.equal(optim.quantize_ref(q, qconst[0 if signed else 1], signed).long(), torch.arange(256))


@needs_native
def test_op_has_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qmaps, qconst = optim.quant_tables()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        p = torch.empty(5000)
        g = torch.empty(5000)
        s = torch.empty(5000, dtype=torch.uint8)
        a = torch.empty(20)
        torch.ops.t2i_fast.adamw8bit_step([p], [g], [s], [s.clone()], [a], [a.clone()], qmaps, qconst, [1],
                                          1e-3, 0.9, 0.999, 1e-8, 0.0)
        ok = torch.ops.t2i_fast.all_finite([g])
        assert ok.shape == () and ok.dtype == torch.bool
    del mode


@needs_native
def test_all_finite_native_vs_ref():
    xs = [torch.randn(70_000), torch.randn(13).bfloat16(), torch.randn(5).half()]
    assert bool(torch.ops.t2i_fast.all_finite(xs)) and bool(optim.all_finite_ref(xs))
    for bad in (math.nan, math.inf, -math.inf):
        for i in range(3):
            ys = [x.clone() for x in xs]
            ys[i].view(-1)[-1] = bad
            assert not bool(torch.ops.t2i_fast.all_finite(ys))
            assert not bool(optim.all_finite_ref(ys))


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls to the native ops and to their twins, as optim reaches them."""
    calls = {"native_step": 0, "twin_step": 0, "native_check": 0, "twin_check": 0}

    def spy(key, fn):
        def wrapped(*args, **kw):
            calls[key] += 1
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(optim, "adamw8bit_step_ref", spy("twin_step", optim.adamw8bit_step_ref))
    monkeypatch.setattr(optim, "all_finite_ref", spy("twin_check", optim.all_finite_ref))
    if native.available():
        ops = torch.ops.t2i_fast
        monkeypatch.setattr(ops, "adamw8bit_step", spy("native_step", ops.adamw8bit_step))
        monkeypatch.setattr(ops, "all_finite", spy("native_check", ops.all_finite))
    return calls


def _step(opt, p, n=1):
    for _ in range(n):
        p.grad = torch.ones_like(p)
        opt.step()


def test_use_kernels_false_routes_the_optimizer_to_its_twins(spies):
    """Inside use_kernels(False) (what --no-kernels wraps a run in) the 8-bit step and the finiteness check
    run their PyTorch twins, whatever T2I_FAST_KERNELS says and whether or not the extension is built."""
    from t2i_fast.kernels import use_kernels

    p = torch.zeros(5000)
    opt = optim.AdamW8bit([p], lr=0.1)
    with use_kernels(False):
        _step(opt, p, 2)
        assert not native.enabled()
        assert optim.all_finite([p])
    assert spies == {"native_step": 0, "twin_step": 2, "native_check": 0, "twin_check": 3}
    assert (p < 0).all()


@needs_native
def test_use_kernels_true_routes_the_optimizer_to_the_native_ops(spies, monkeypatch):
    """Inside use_kernels(True) the native ops run even under T2I_FAST_KERNELS=0, and the switch is read at
    each step: one optimizer follows the block it steps in."""
    from t2i_fast.kernels import use_kernels

    monkeypatch.setenv("T2I_FAST_KERNELS", "0")
    p = torch.zeros(5000)
    opt = optim.AdamW8bit([p], lr=0.1)
    with use_kernels(True):
        _step(opt, p)
        assert optim.all_finite([p])
    assert spies == {"native_step": 1, "twin_step": 0, "native_check": 2, "twin_check": 0}
    _step(opt, p)  # outside the block: the environment's default, off
    assert spies == {"native_step": 1, "twin_step": 1, "native_check": 2, "twin_check": 1}
    with use_kernels(True):
        with use_kernels(False):
            _step(opt, p)
        _step(opt, p)
    assert spies == {"native_step": 2, "twin_step": 2, "native_check": 3, "twin_check": 2}


@needs_native
def test_an_explicit_backend_beats_the_switch(spies):
    """backend="native" / "ref" is an explicit argument: it holds inside any use_kernels block (the
    finiteness check, which has no such argument, follows the switch)."""
    from t2i_fast.kernels import use_kernels

    pn, pr = torch.zeros(5000), torch.zeros(5000)
    on, ref = optim.AdamW8bit([pn], lr=0.1, backend="native"), optim.AdamW8bit([pr], lr=0.1, backend="ref")
    with use_kernels(False):
        _step(on, pn)
    with use_kernels(True):
        _step(ref, pr)
    assert spies["native_step"] == 1 and spies["twin_step"] == 1
    assert torch.equal(pn, pr)


ENV_DEFAULT = (
    "import sys, warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "from t2i_fast import optim\n"
    "from t2i_fast.kernels import use_kernels\n"
    "twin = optim.adamw8bit_step_ref\n"
    "calls = []\n"
    "optim.adamw8bit_step_ref = lambda *a: calls.append('twin') or twin(*a)\n"
    "p = torch.zeros(5000)\n"
    "o = optim.AdamW8bit([p], lr=0.1)\n"
    "def step():\n"
    "    p.grad = torch.ones(5000); o.step()\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    step(); step()\n"
    "    loaded = 't2i_fast._C' in sys.modules\n"
    "    with use_kernels(True):\n"
    "        step()\n"
    "assert (p < 0).all()\n"
    "print(calls.count('twin'), loaded, sum('T2I_FAST_NATIVE' in str(x.message) for x in w))\n"
)


@needs_native
@pytest.mark.parametrize("env,twin_steps,loaded", [("1", 0, True), ("0", 2, False)], ids=["on", "off"])
def test_the_environment_is_only_the_default(env, twin_steps, loaded):
    """In a fresh process T2I_FAST_KERNELS decides for the optimizer outside any block (off: the extension is
    not even imported), a use_kernels(True) block overrides it, and T2I_FAST_NATIVE, no longer read, is
    reported once instead of silently ignored."""
    environ = {**os.environ, "T2I_FAST_KERNELS": env, "T2I_FAST_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-c", ENV_DEFAULT], env=environ, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(twin_steps), str(loaded), "1"], r.stdout + r.stderr


def test_import_t2i_fast_does_not_load_extension():
    code = "import sys, t2i_fast, t2i_fast.optim; print('t2i_fast._C' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
