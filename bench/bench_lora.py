#!/usr/bin/env python
"""Microbenchmark: fused LoRA linear (t2i_fast.kernels.lora_linear) against peft's LoRA Linear, the
unfused reference, and the bare frozen layer (x·Wᵀ and dy·W alone: the floor). "fused" is the op as the
library calls it (inputs under SMALL_INPUT elements, or with few rows for the layer's size, take the twin on the
PyTorch path); "fused-always" runs
the fused Function at every size, which is how that threshold was chosen:

    python bench/bench_lora.py --threads 1 --shapes 64x32x32x4 64x64x64x4 256x64x64x4 1024x64x64x4 256x320x320x4

Forward, backward and forward+backward with x requiring grad (as inside a trained network); median and
spread over interleaved rounds, speed-ups both as ratios of medians and as the median of per-round ratios
(robust to drifting load on a shared host), TFLOP/s from analytic FLOP counts, memory saved for backward
(CPU) or peak CUDA memory. Rows are appended to bench/results.csv.

    python bench/bench_lora.py                       # SD shapes on the default device
    python bench/bench_lora.py --shapes 4096x320x320x4 --rounds 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_kernel_args, append_results, apply_kernel_args, peak_rss_mib, sync, time_fn  # noqa: E402

# M x in x out x rank: SD 1.5 to_q/to_out at 64² latents (4096 tokens, 320 ch), 32² (1024, 640), 16² (256, 1280)
DEFAULT_SHAPES = ["4096x320x320x4", "1024x640x640x16", "256x1280x1280x16", "2048x640x640x8"]


def make_variants(M, n_in, n_out, r, device, dtype):
    from peft import LoraConfig, get_peft_model

    import importlib

    from t2i_fast.kernels import lora_linear, lora_linear_ref

    op = importlib.import_module("t2i_fast.kernels.lora_linear")  # the module (its function has the same name)

    def fused_at_every_size(x):
        """lora_linear with the small-input rule off: the fused Function even where the twin is faster."""
        rules, (op.SMALL_INPUT, op.FEW_ROWS) = (op.SMALL_INPUT, op.FEW_ROWS), (0, 0.0)
        try:
            return lora_linear(x, base.weight, base.bias, a, b, 1.0)
        finally:
            op.SMALL_INPUT, op.FEW_ROWS = rules

    torch.manual_seed(0)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(n_in, n_out)

    model = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=r, target_modules=["proj"])).to(device, dtype)
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return {
        "bare": lambda x: base(x),
        "peft": lambda x: layer(x),
        "ref": lambda x: lora_linear_ref(x, base.weight, base.bias, a, b, 1.0),
        "fused": lambda x: lora_linear(x, base.weight, base.bias, a, b, 1.0),
        "fused-always": fused_at_every_size,
    }


def flops(M, n_in, n_out, r, variant, mode):
    f = 2 * M * n_in * n_out
    lo_f = 2 * M * r * (n_in + n_out)                      # x·Aᵀ then (xAᵀ)·Bᵀ
    lo_b = 2 * M * r * (n_in + n_out) * 2                  # dy·B, (dyB)·A for dx; dA and dB
    fwd = f if variant == "bare" else f + lo_f
    bwd = f if variant == "bare" else f + lo_b
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def saved_mib(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size() if t.data_ptr() != x.data_ptr() else 0
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(p, rounds=7, reps=5)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxINxOUTxRANK")
    args = p.parse_args(argv)
    dtype = apply_kernel_args(args)
    rows = []
    for shape in args.shapes:
        M, n_in, n_out, r = (int(v) for v in shape.split("x"))
        variants = make_variants(M, n_in, n_out, r, args.device, dtype)
        x = torch.randn(M, n_in, device=args.device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, n_out, device=args.device, dtype=dtype)
        graphs = {}

        def job(name, mode):
            fn = variants[name]
            if mode == "fwd":
                return lambda: fn(x)
            if mode == "fwd+bwd":
                return lambda: fn(x).backward(dy)
            return lambda: graphs[name].backward(dy, retain_graph=True)

        times = {(v, m): [] for v in variants for m in ("fwd", "bwd", "fwd+bwd")}
        for v in variants:
            graphs[v] = variants[v](x)
        for _ in range(args.rounds):
            for key in times:
                times[key].append(time_fn(job(*key), warmup=1, reps=args.reps)[0])
        case = f"M{M}-{n_in}to{n_out}-r{r}-{str(dtype).split('.')[-1]}-t{torch.get_num_threads()}"
        print(f"\n{case} on {args.device}")
        print(f"{'variant':8s} {'mode':8s} {'median ms':>10s} {'spread':>8s} {'TFLOP/s':>8s} {'vs peft':>8s} {'vs bare':>8s}"
              f" {'paired vs peft':>15s} {'paired vs bare':>15s}")
        for (v, mode), ts in times.items():
            med, spread = statistics.median(ts), (max(ts) - min(ts)) / 2
            peft_med = statistics.median(times[("peft", mode)])
            bare_med = statistics.median(times[("bare", mode)])
            tf = flops(M, n_in, n_out, r, v, mode) / med / 1e12
            # per-round ratios: each round times every variant within a few seconds, so a slow drift in
            # machine load (other jobs on a shared host) cancels; reported as median [min, max] over rounds
            pp = [p_ / t for p_, t in zip(times[("peft", mode)], ts)]
            pb = [b_ / t for b_, t in zip(times[("bare", mode)], ts)]
            print(f"{v:8s} {mode:8s} {med * 1e3:10.3f} {spread * 1e3:8.3f} {tf:8.3f} {peft_med / med:7.2f}x {bare_med / med:7.2f}x"
                  f" {statistics.median(pp):5.2f}x {min(pp):4.2f}-{max(pp):4.2f} {statistics.median(pb):5.2f}x {min(pb):4.2f}-{max(pb):4.2f}")
            rows.append(dict(bench="lora", case=case, variant=v, metric=f"{mode}_ms", value=f"{med * 1e3:.4f}",
                             spread=f"{spread * 1e3:.4f}", unit="ms", baseline="peft", ratio=f"{peft_med / med:.3f}"))
            if v != "peft":
                rows.append(dict(bench="lora", case=case, variant=v, metric=f"{mode}_ms_vs_bare", value=f"{med * 1e3:.4f}",
                                 spread=f"{spread * 1e3:.4f}", unit="ms", baseline="bare", ratio=f"{med / bare_med:.3f}"))
            if v not in ("peft", "bare"):
                for base, rs in (("peft", pp), ("bare", pb)):
                    rows.append(dict(bench="lora", case=case, variant=v, metric=f"{mode}_speedup_paired",
                                     value=f"{statistics.median(rs):.3f}", spread=f"{(max(rs) - min(rs)) / 2:.3f}",
                                     unit="x", baseline=base, ratio=f"{statistics.median(rs):.3f}"))
        for v, fn in variants.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                sync()
                fn(x).backward(dy)
                sync()
                mem, unit = torch.cuda.max_memory_allocated() / 2**20, "MiB peak"
            else:
                mem, unit = saved_mib(fn, x), "MiB saved for backward"
            print(f"{v:8s} memory {mem:8.2f} {unit}")
            rows.append(dict(bench="lora", case=case, variant=v, metric="memory", value=f"{mem:.2f}", unit=unit))
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    if not args.no_csv:
        append_results(rows)


if __name__ == "__main__":
    main()
