"""kernels.attention: the Triton kernel (interpreter, fp32), the fused PyTorch paths (fp32, bf16) and the
nn/ processors against the twin, an fp64 reference, and diffusers' AttnProcessor2_0 /
CustomDiffusionAttnProcessor with shared weights.

Tolerances are relative to PyTorch's own error: |ours − fp64| <= 2·|torch − fp64| + floor·max|fp64|, where
"torch" is plain softmax(Q Kᵀ·s) V computed by torch ops in the same dtype.
The interpreter cases need TRITON_INTERPRET=1 before Triton is first imported, so test_triton_interpreter
reruns them in a fresh subprocess.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import t2i_fast.kernels as K
from interpreter_runner import IN_INTERPRETER, check_vs_fp64, run_interpreter_cases

ATT = sys.modules["t2i_fast.kernels.attention"]
NAMES = ["out", "dq", "dk", "dv"]


def naive(q, k, v, scale=None):
    """softmax(Q Kᵀ · scale) V in the inputs' own dtype: PyTorch's own error at that precision."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _inputs(B, H, Nq, Nk, D, seed=0, bnhd=True):
    g = torch.Generator().manual_seed(seed)

    def t(n):
        x = torch.randn(B, n, H, D, generator=g, dtype=torch.float64)
        return x.transpose(1, 2) if bnhd else x.transpose(1, 2).contiguous()  # diffusers' strided layout
    return t(Nq), t(Nk), t(Nk), t(Nq)


def _run(fn, qkvd, dtype):
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in qkvd[:3])
    o = fn(q, k, v)
    return [o] + list(torch.autograd.grad(o, (q, k, v), qkvd[3].to(dtype)))


# (B, H, Nq, Nk, D). Interpreter tiles are 16 query × 32 key rows: every case spans several tiles in Nq
# and Nk and several programs in B·H; D=40/80/160 use both head-dim pieces, D=64 one.
TRITON_CASES = [
    pytest.param(2, 2, 37, 77, 40, id="B2H2-Nq37-Nk77-D40"),
    pytest.param(1, 2, 33, 77, 80, id="B1H2-Nq33-Nk77-D80"),
    pytest.param(2, 1, 19, 77, 160, id="B2H1-Nq19-Nk77-D160"),
    pytest.param(1, 3, 45, 45, 64, id="B1H3-Nq45-Nk45-D64-self"),
    pytest.param(1, 2, 21, 5, 24, id="B1H2-Nq21-Nk5-D24"),
]


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreter run")
def test_triton_interpreter():
    run_interpreter_cases(__file__)


_CACHE: dict = {}


@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("B,H,Nq,Nk,D", TRITON_CASES)
def test_interp_case_fp32(B, H, Nq, Nk, D, which):
    """One test id per output and gradient; each case's kernels run once (cached)."""
    assert K.backend(torch.zeros(1)) == "triton"
    key = (B, H, Nq, Nk, D)
    if key not in _CACHE:
        x = _inputs(B, H, Nq, Nk, D)
        _CACHE[key] = (_run(K.attention, x, torch.float32), _run(naive, x, torch.float32),
                       _run(K.attention_ref, x, torch.float64))
    i = NAMES.index(which)
    ours, base, gold = (r[i:i + 1] for r in _CACHE[key])
    check_vs_fp64(ours, base, gold, [which], floor=1e-5)


if not IN_INTERPRETER:  # collected only in test_triton_interpreter's TRITON_INTERPRET=1 subprocess
    del test_interp_case_fp32


TORCH_CASES = [
    pytest.param(2, 2, 37, 77, 40, id="B2H2-Nq37-Nk77-D40"),
    pytest.param(1, 2, 257, 77, 80, id="B1H2-Nq257-Nk77-D80"),
    pytest.param(2, 1, 64, 64, 160, id="B2H1-Nq64-Nk64-D160-self"),
    pytest.param(1, 2, 300, 300, 64, id="B1H2-Nq300-Nk300-D64-self"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Nq,Nk,D", TORCH_CASES)
def test_fused_torch(fused_torch, B, H, Nq, Nk, D, dtype):
    x = _inputs(B, H, Nq, Nk, D)
    gold = _run(K.attention_ref, x, torch.float64)
    base = _run(naive, x, dtype)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    check_vs_fp64(_run(K.attention, x, dtype), base, gold, NAMES, floor)
    check_vs_fp64(_run(K.attention_ref, x, dtype), base, gold, NAMES, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_torch_path(monkeypatch, dtype):
    """The device-agnostic chunked path (used off the CPU when Triton is absent), forced to many chunks."""
    monkeypatch.setattr(ATT, "CHUNK_ELEMS", 2 * 77 * 7)
    x = _inputs(2, 2, 37, 77, 40)

    def chunked(q, k, v):
        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                o, lse = ATT._fwd_chunked(q, k, v, 40 ** -0.5)
                ctx.save_for_backward(q, k, v, o, lse)
                return o

            @staticmethod
            def backward(ctx, do):
                return ATT._bwd_chunked(do, *ctx.saved_tensors, 40 ** -0.5)
        return F.apply(q, k, v)

    gold = _run(K.attention_ref, x, torch.float64)
    check_vs_fp64(_run(chunked, x, dtype), _run(naive, x, dtype), gold, NAMES, 1e-5 if dtype == torch.float32 else 1e-3)


def test_kernels_off_and_layout(monkeypatch):
    q, k, v, _ = (t.float() for t in _inputs(1, 2, 9, 77, 40))
    monkeypatch.setenv("T2I_FAST_KERNELS", "0")
    off = K.attention(q, k, v)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    on = K.attention(q, k, v)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    assert on.transpose(1, 2).is_contiguous()  # the processor's reshape back to (B, N, H·D) is free
    with pytest.raises(ValueError):
        K.attention(q, k[..., :8], v[..., :8])


# ---- the nn/ processors against the diffusers processors they replace ------------------------------------

def _attn_module(query_dim=80, cross_dim=48, heads=2, dim_head=40):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads, dim_head=dim_head)


def _fwd_bwd(attn, hs, ehs, params):
    hs, ehs = hs.clone().requires_grad_(), None if ehs is None else ehs.clone().requires_grad_()
    out = attn(hs, encoder_hidden_states=ehs)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [hs] + ([ehs] if ehs is not None else []) + params)
    return [out] + list(grads)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fast_processor_matches_attnprocessor2_0(fused_torch, cross):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2i_fast.nn.attention import FastAttnProcessor

    attn = _attn_module(cross_dim=48 if cross else None)
    hs = torch.randn(2, 37, 80)
    ehs = torch.randn(2, 77, 48) if cross else None
    params = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_out[0].weight]
    attn.set_processor(AttnProcessor2_0())
    theirs = _fwd_bwd(attn, hs, ehs, params)
    attn.set_processor(FastAttnProcessor())
    ours = _fwd_bwd(attn, hs, ehs, params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fast_processor_with_mask_falls_back(fused_torch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2i_fast.nn.attention import FastAttnProcessor

    attn = _attn_module()
    hs, ehs = torch.randn(2, 37, 80), torch.randn(2, 77, 48)
    mask = torch.zeros(2, 1, 77)
    mask[0, :, 60:] = -10000.0
    outs = []
    for proc in (AttnProcessor2_0(), FastAttnProcessor()):
        attn.set_processor(proc)
        outs.append(attn(hs, encoder_hidden_states=ehs, attention_mask=mask))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_q_out", [False, True], ids=["kv", "kv+q_out"])
def test_fast_custom_diffusion_matches_diffusers(fused_torch, train_q_out):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    from t2i_fast.nn.attention import FastCustomDiffusionAttnProcessor

    attn = _attn_module()
    kw = dict(train_kv=True, train_q_out=train_q_out, hidden_size=80, cross_attention_dim=48)
    torch.manual_seed(1)
    theirs_p = CustomDiffusionAttnProcessor(**kw)
    ours_p = FastCustomDiffusionAttnProcessor(**kw)
    assert set(ours_p.state_dict()) == set(theirs_p.state_dict())
    ours_p.load_state_dict(theirs_p.state_dict())               # diffusers -> ours
    theirs_p.load_state_dict(ours_p.state_dict())               # ours -> diffusers
    hs, ehs = torch.randn(2, 37, 80), torch.randn(2, 77, 48)
    results = []
    for proc in (theirs_p, ours_p):
        attn.set_processor(proc)
        results.append(_fwd_bwd(attn, hs, ehs, list(proc.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    d_ehs = results[1][2]
    assert d_ehs[:, 0].abs().max() == 0 and d_ehs[:, 1:].abs().max() > 0  # start token detached


def test_fast_custom_diffusion_self_attention(fused_torch):
    """attn1 in Custom Diffusion: train_kv=False, no detach (not cross-attention)."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    from t2i_fast.nn.attention import FastCustomDiffusionAttnProcessor

    attn = _attn_module(cross_dim=None)
    kw = dict(train_kv=False, train_q_out=False, hidden_size=80, cross_attention_dim=None)
    hs = torch.randn(2, 37, 80)
    params = [attn.to_q.weight, attn.to_k.weight]
    results = []
    for proc in (CustomDiffusionAttnProcessor(**kw), FastCustomDiffusionAttnProcessor(**kw)):
        attn.set_processor(proc)
        results.append(_fwd_bwd(attn, hs, None, params))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_set_fast_attention_keeps_custom_diffusion():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2i_fast.nn.attention import FastAttnProcessor, FastCustomDiffusionAttnProcessor, set_fast_attention
    from t2i_fast.testing import build_pipeline

    unet = build_pipeline("tiny").unet
    names = [n for n in unet.attn_processors if "attn2" in n]
    cd = FastCustomDiffusionAttnProcessor(hidden_size=32, cross_attention_dim=32)
    unet.set_attn_processor({n: (cd if n == names[0] else p) for n, p in unet.attn_processors.items()})
    n = set_fast_attention(unet)
    procs = unet.attn_processors
    assert n == len(procs) - 1 and procs[names[0]] is cd
    assert all(isinstance(p, FastAttnProcessor) for k, p in procs.items() if k != names[0])
    set_fast_attention(unet, enabled=False)
    assert all(isinstance(p, AttnProcessor2_0) for k, p in unet.attn_processors.items() if k != names[0])


def test_import_is_lazy():
    """Importing the kernels imports neither Triton nor diffusers and leaves CUDA uninitialised."""
    code = ("import sys, torch, t2i_fast.kernels, t2i_fast.nn.lora; "
            "assert 'triton' not in sys.modules and 'diffusers' not in sys.modules; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_torch_compile_traces_all_ops(fused_torch):
    """fullgraph torch.compile (aot_eager: tracing, no codegen) through the ops and their backward."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, n, 40, requires_grad=True) for n in (37, 77, 77))
    x, a, b = torch.randn(5, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True), torch.randn(8, 2)
    w, c, d = torch.randn(8, 16), torch.randn(2, 77, 16), torch.randn(3, 8, 16, requires_grad=True)
    idx = torch.tensor([2, 0])

    def f(q, k, v, x, c):
        return (K.attention(q, k, v).sum() + K.lora_linear(x, w, None, a, b, 0.5).sum()
                + K.kv_delta(c, w, d, idx).sum())

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, x, c)
    out.backward()
    grads = [t.grad.clone() for t in (q, k, v, x, a, d)]
    for t in (q, k, v, x, a, d):
        t.grad = None
    ref = f(q, k, v, x, c)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for g, t in zip(grads, (q, k, v, x, a, d)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def aot_compile_sm90(fn, pointers: dict, floats: set, constexprs: dict, num_warps: int, num_stages: int):
    """Compile a @triton.jit kernel for an H100 (sm_90) without a GPU; returns ptxas's resource line.

    Catches what the interpreter cannot: GPU-only compile errors (dot shapes, layouts, scoping) and
    register spills. Skips when this Triton build has no CUDA backend or no bundled ptxas.
    """
    import pathlib
    import subprocess as sp
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in fn.params:
        sig[p.name] = ("constexpr" if p.is_constexpr else pointers.get(p.name)
                       or ("fp32" if p.name in floats else "i32"))
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except (ImportError, RuntimeError) as e:  # pragma: no cover - depends on the Triton build
        if "backend" in str(e).lower():
            pytest.skip(f"no CUDA backend in this Triton build: {e}")
        raise
    nvbin = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        for exe in ("ptxas-blackwell", "ptxas"):
            if (nvbin / exe).exists():
                r = sp.run([str(nvbin / exe), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx) + ".cubin"],
                           capture_output=True, text=True)
                if r.returncode == 0:
                    return r.stderr
    pytest.skip("no bundled ptxas that accepts this PTX")


@pytest.mark.parametrize("D", [40, 64, 80, 160])
def test_triton_attention_compiles_for_sm90_without_spills(monkeypatch, D):
    """The GPU build of the three attention kernels at the launcher's own block sizes, bf16."""
    pytest.importorskip("triton")
    if IN_INTERPRETER:
        pytest.skip("the kernels are interpreter functions in a TRITON_INTERPRET=1 process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from t2i_fast.kernels import _attention_triton as A
    from t2i_fast.kernels._dispatch import head_split

    d0, d1 = head_split(D)
    bm, bn, warps, stages = A.fwd_config(D)
    bm1, bn1, bm2, bn2, bwarps, bstages = A.bwd_config(D)
    common = dict(D=D, D0=d0, D1=d1, PRECISION="tf32")
    bf = "*bf16"
    runs = [
        (A._attn_fwd_kernel, dict(Q=bf, K=bf, V=bf, O=bf, LSE="*fp32"), {"qk_scale"},
         dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages),
        (A._attn_bwd_dkdv_kernel, dict(Q=bf, K=bf, V=bf, DO=bf, DK=bf, DV=bf, LSE="*fp32", DELTA="*fp32"),
         {"sm_scale", "qk_scale"}, dict(common, BLOCK_M=bm1, BLOCK_N=bn1), bwarps, bstages),
        (A._attn_bwd_dq_kernel, dict(Q=bf, K=bf, V=bf, DO=bf, DQ=bf, LSE="*fp32", DELTA="*fp32"),
         {"sm_scale", "qk_scale"}, dict(common, BLOCK_M=bm2, BLOCK_N=bn2), bwarps, bstages),
    ]
    for fn, ptrs, floats, consts, w, s in runs:
        info = aot_compile_sm90(fn, ptrs, floats, consts, w, s)
        assert " 0 bytes spill stores" in info, f"{fn.__name__} D={D} spills registers:\n{info}"


def test_triton_lora_and_kv_delta_compile_for_sm90(monkeypatch):
    pytest.importorskip("triton")
    if IN_INTERPRETER:
        pytest.skip("the kernels are interpreter functions in a TRITON_INTERPRET=1 process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from t2i_fast.kernels import _kv_delta_triton as KV
    from t2i_fast.kernels import _lora_triton as L

    bm, bn, bk, w, s = L.blocks(4096, 320)
    info = aot_compile_sm90(L._gemm_lowrank_kernel, {n: "*bf16" for n in ("X", "W", "BIAS", "U", "Y", "XU")}, set(),
                            dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, GROUP_M=8,
                                 PRECISION="tf32"), w, s)
    assert " 0 bytes spill stores" in info, info
    bm, bn, bk, w, s = KV.blocks(77, 320)
    info = aot_compile_sm90(KV._kv_delta_kernel, dict(X="*bf16", W="*bf16", DELTA="*bf16", IDX="*i64", Y="*bf16"),
                            set(), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION="tf32"), w, s)
    assert " 0 bytes spill stores" in info, info
