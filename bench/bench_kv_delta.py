#!/usr/bin/env python
"""Microbenchmark: Custom Diffusion's K/V projections and cross-attention processor.

Three levels, each against its baseline in the same run:
  kv        K and V of one cross-attention layer, W frozen and ΔW trained: kernels.kv_delta(context, W, ΔW)
            for K and V, against diffusers' CustomDiffusionAttnProcessor path (full trained to_k/to_v
            Linear layers plus its ones_like/mask start-token detach) and the unfused twin.
  multi     E concepts served in one batch (per-sample delta chosen by index) against one call per concept.
  processor the whole attn2 call: t2i_fast's FastCustomDiffusionAttnProcessor against diffusers'
            CustomDiffusionAttnProcessor (shared weights).
SD 1.5 shapes: context (B, 77, 768), hidden 320/640/1280 at 4096/1024/256 query tokens, 8 heads.
Forward, backward (grads for the trained weights), forward+backward; median and spread over interleaved
rounds; TFLOP/s (kv, multi: 2·B·77·768·C per projection forward, 2× backward). Rows go to bench/results.csv.

    python bench/bench_kv_delta.py
    python bench/bench_kv_delta.py --levels kv --cases 2x320x4096
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_kernel_args, append_results, apply_kernel_args, peak_rss_mib, time_fn  # noqa: E402

CASES = ["2x320x4096", "2x640x1024", "2x1280x256"]  # B x hidden x query tokens
CTX, NK, HEADS = 768, 77, 8


def _detach_like_diffusers(x):
    detach = torch.ones_like(x)
    detach[:, :1, :] = detach[:, :1, :] * 0.0
    return detach * x + (1 - detach) * x.detach()


def build(level, B, C, Nq, device, dtype, E):
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor

    from t2i_fast.kernels import kv_delta, kv_delta_ref
    from t2i_fast.nn.attention import FastCustomDiffusionAttnProcessor

    torch.manual_seed(0)
    ctx = torch.randn(B, NK, CTX, device=device, dtype=dtype)
    wk, wv = (torch.randn(C, CTX, device=device, dtype=dtype) * CTX ** -0.5 for _ in range(2))
    if level == "kv":
        dk, dv = (torch.zeros(C, CTX, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=C,
                                            cross_attention_dim=CTX).to(device, dtype)

        def diffusers_kv():
            return (_detach_like_diffusers(proc.to_k_custom_diffusion(ctx)),
                    _detach_like_diffusers(proc.to_v_custom_diffusion(ctx)))
        fns = {"diffusers_cd": diffusers_kv,
               "ref": lambda: (kv_delta_ref(ctx, wk, dk), kv_delta_ref(ctx, wv, dv)),
               "t2i_fast": lambda: (kv_delta(ctx, wk, dk), kv_delta(ctx, wv, dv))}
        return fns, "diffusers_cd", 2 * (2 * B * NK * CTX * C)
    if level == "multi":
        dk = (torch.randn(E, C, CTX, device=device, dtype=dtype) * 1e-3).requires_grad_()
        index = torch.arange(B, device=device) % E

        def per_concept():
            return torch.cat([kv_delta_ref(ctx[b:b + 1], wk, dk[index[b]]) for b in range(B)])
        fns = {"per_concept": per_concept, "ref": lambda: kv_delta_ref(ctx, wk, dk, index),
               "t2i_fast": lambda: kv_delta(ctx, wk, dk, index)}
        return fns, "per_concept", 2 * B * NK * CTX * C
    attn = Attention(query_dim=C, cross_attention_dim=CTX, heads=HEADS, dim_head=C // HEADS).to(device, dtype)
    attn.requires_grad_(False)
    theirs = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=C,
                                          cross_attention_dim=CTX).to(device, dtype)
    ours = FastCustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=C,
                                            cross_attention_dim=CTX).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    hs = torch.randn(B, Nq, C, device=device, dtype=dtype, requires_grad=True)
    fns = {"diffusers_cd": lambda: theirs(attn, hs, ctx), "t2i_fast": lambda: ours(attn, hs, ctx)}
    return fns, "diffusers_cd", 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(p, rounds=5, reps=3)
    p.add_argument("--levels", nargs="+", default=["kv", "multi", "processor"], choices=["kv", "multi", "processor"])
    p.add_argument("--cases", nargs="+", default=CASES, help="BxHIDDENxNQ")
    p.add_argument("--concepts", type=int, default=2, help="E for the multi level (batch is raised to 2E)")
    args = p.parse_args(argv)
    dtype = apply_kernel_args(args)
    rows = []
    for level in args.levels:
        for c in args.cases:
            B, C, Nq = (int(v) for v in c.split("x"))
            if level == "multi":
                B = max(B, 2 * args.concepts)
            fns, base, fwd_flops = build(level, B, C, Nq, args.device, dtype, args.concepts)

            def total(out):
                outs = out if isinstance(out, tuple) else (out,)
                return sum(o.float().square().mean() for o in outs)
            graphs = {n: total(f()) for n, f in fns.items()}

            def job(name, mode):
                f = fns[name]
                if mode == "fwd":
                    return lambda: f()
                if mode == "fwd+bwd":
                    return lambda: total(f()).backward()
                return lambda: graphs[name].backward(retain_graph=True)

            times = {(n, m): [] for n in fns for m in ("fwd", "bwd", "fwd+bwd")}
            for _ in range(args.rounds):
                for key in times:
                    times[key].append(time_fn(job(*key), warmup=1, reps=args.reps)[0])
            case = f"{level}-B{B}-C{C}" + (f"-Nq{Nq}" if level == "processor" else "") + \
                (f"-E{args.concepts}" if level == "multi" else "") + f"-{str(dtype).split('.')[-1]}"
            print(f"\n{case} on {args.device}")
            print(f"{'variant':13s} {'mode':8s} {'median ms':>10s} {'spread':>8s} {'TFLOP/s':>8s} {'vs ' + base:>16s}")
            for (n, mode), ts in times.items():
                med, spread = statistics.median(ts), (max(ts) - min(ts)) / 2
                ratio = statistics.median(times[(base, mode)]) / med
                fl = fwd_flops * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
                tf = f"{fl / med / 1e12:8.3f}" if fl else f"{'-':>8s}"
                print(f"{n:13s} {mode:8s} {med * 1e3:10.3f} {spread * 1e3:8.3f} {tf} {ratio:15.2f}x")
                rows.append(dict(bench="kv_delta", case=case, variant=n, metric=f"{mode}_ms", value=f"{med * 1e3:.4f}",
                                 spread=f"{spread * 1e3:.4f}", unit="ms", baseline=base, ratio=f"{ratio:.3f}"))
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    if not args.no_csv:
        append_results(rows)


if __name__ == "__main__":
    main()
