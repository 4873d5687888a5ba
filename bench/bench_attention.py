#!/usr/bin/env python
"""Microbenchmark: t2i_fast.kernels.attention against torch SDPA (default dispatch, and the flash backend
on CUDA), xformers when installed, and the plain twin (small shapes only: it materialises Nq×Nk).

SD 1.5 at 512² (8 heads; 4096/1024/256 query tokens with head dims 40/80/160; self-attention and
cross-attention to 77 text tokens) and SDXL (head dim 64). Forward, backward, forward+backward: median and
spread over interleaved rounds, TFLOP/s (forward 4·B·H·Nq·Nk·D, backward 2.5× that), memory saved for
backward (CPU) or peak CUDA memory. On the CPU the fused path is ATen's flash CPU kernel behind our
autograd.Function (see kernels/attention.py), so parity with SDPA is the expectation there; the Triton
kernel is what runs on CUDA. Rows are appended to bench/results.csv.

    python bench/bench_attention.py                     # default shapes for the device
    python bench/bench_attention.py --shapes 1x8x4096x4096x40 --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_kernel_args, append_results, apply_kernel_args, peak_rss_mib, sync, time_fn  # noqa: E402

# BxHxNqxNkxD
SD15 = ["2x8x4096x4096x40", "2x8x4096x77x40", "2x8x1024x1024x80", "2x8x1024x77x80", "2x8x256x256x160",
        "2x8x256x77x160"]
SDXL = ["2x10x4096x4096x64", "2x20x1024x1024x64", "2x10x4096x77x64"]
CPU_DEFAULT = ["1x8x4096x77x40", "1x8x1024x1024x80", "1x8x1024x77x80", "1x8x256x256x160", "1x8x256x77x160",
               "1x20x1024x77x64"]
REF_LIMIT = 1 << 26  # B·H·Nq·Nk above which the twin (full score matrix) is skipped


def variants(device, shape):
    from t2i_fast.kernels import attention, attention_ref

    B, H, Nq, Nk, D = shape
    out = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        out["sdpa_flash"] = flash  # needs fp16/bf16: the default CUDA dtype is bf16
    try:
        import xformers.ops as xops

        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except ImportError:
        pass
    out["t2i_fast"] = lambda q, k, v: attention(q, k, v)
    if B * H * Nq * Nk <= REF_LIMIT:
        out["ref"] = lambda q, k, v: attention_ref(q, k, v)
    return out


def saved_mib(fn, *inputs):
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values()) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(p, rounds=5, reps=3)
    p.add_argument("--shapes", nargs="+", default=None, help="BxHxNqxNkxD (default: SD 1.5 + SDXL on CUDA, "
                   "a CPU-sized subset on CPU)")
    args = p.parse_args(argv)
    dtype = apply_kernel_args(args)
    cuda = args.device.startswith("cuda")
    shapes = args.shapes or (SD15 + SDXL if cuda else CPU_DEFAULT)
    rows = []
    for s in shapes:
        shape = tuple(int(v) for v in s.split("x"))
        B, H, Nq, Nk, D = shape
        g = torch.Generator(device=args.device).manual_seed(0)
        # diffusers' layout: (B, N, H, D) buffers viewed as (B, H, N, D)
        mk = lambda n: torch.randn(B, n, H, D, device=args.device, dtype=dtype, generator=g).transpose(1, 2)  # noqa: E731
        q, k, v = (mk(n).requires_grad_() for n in (Nq, Nk, Nk))
        do = torch.randn(B, H, Nq, D, device=args.device, dtype=dtype, generator=g)
        fns = variants(args.device, shape)
        graphs = {name: fn(q, k, v) for name, fn in fns.items()}

        def job(name, mode):
            fn = fns[name]
            if mode == "fwd":
                return lambda: fn(q, k, v)
            if mode == "fwd+bwd":
                return lambda: fn(q, k, v).backward(do)
            return lambda: graphs[name].backward(do, retain_graph=True)

        times = {(n, m): [] for n in fns for m in ("fwd", "bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for key in times:
                times[key].append(time_fn(job(*key), warmup=1, reps=args.reps)[0])
        fwd_flops = 4 * B * H * Nq * Nk * D
        case = f"B{B}H{H}-Nq{Nq}-Nk{Nk}-D{D}-{str(dtype).split('.')[-1]}-t{torch.get_num_threads()}"
        print(f"\n{case} on {args.device}")
        print(f"{'variant':10s} {'mode':8s} {'median ms':>10s} {'spread':>8s} {'TFLOP/s':>8s} {'vs sdpa':>8s}")
        base = "sdpa_flash" if cuda and ("sdpa_flash", "fwd") in times else "sdpa"
        for (n, mode), ts in times.items():
            med, spread = statistics.median(ts), (max(ts) - min(ts)) / 2
            ratio = statistics.median(times[(base, mode)]) / med
            tf = fwd_flops * {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[mode] / med / 1e12
            print(f"{n:10s} {mode:8s} {med * 1e3:10.3f} {spread * 1e3:8.3f} {tf:8.3f} {ratio:7.2f}x")
            rows.append(dict(bench="attention", case=case, variant=n, metric=f"{mode}_ms", value=f"{med * 1e3:.4f}",
                             spread=f"{spread * 1e3:.4f}", unit="ms", baseline=base, ratio=f"{ratio:.3f}"))
        for n, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                fn(q, k, v).backward(do)
                sync()
                mem, unit = torch.cuda.max_memory_allocated() / 2**20, "MiB peak"
            else:
                mem, unit = saved_mib(fn, q, k, v), "MiB saved for backward"
            print(f"{n:10s} memory {mem:10.2f} {unit}")
            rows.append(dict(bench="attention", case=case, variant=n, metric="memory", value=f"{mem:.2f}", unit=unit))
        del graphs
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    if not args.no_csv:
        append_results(rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
