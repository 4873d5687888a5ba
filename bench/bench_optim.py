"""Optimizer step time and state size: native blockwise 8-bit AdamW vs bitsandbytes' AdamW8bit vs torch's fused
fp32 AdamW, all measured in this run on the same parameters.

Cases (real SD 1.5 shapes):
  cd_kv    Custom Diffusion: attn2.to_k / to_v of the 16 transformer blocks, 32 tensors (d, 768),
           19,169,280 parameters
  lora_r8  DreamBooth-LoRA on to_q/k/v/out of every attention, rank 8: 256 tensors, 1,594,368 parameters
           (rank 4 would be 797,184; the issue's "1.6 M" matches rank 8 on these layers)

    python bench/bench_optim.py [--cases cd_kv,lora_r8] [--threads N] [--reps 5] [--rounds 5] [--no-bnb] [--ref]
                                [--no-csv]

Variants: torch_fused_adamw (baseline), native8bit (AdamW8bit as users get it: native op plus the
non-finite-gradient check), native8bit_nocheck (nonfinite="off": the op alone), bnb_adamw8bit
(bitsandbytes' AdamW8bit on the same tensors; CPU build, slow: one round of 3 steps), ref8bit (--ref).
Rows go to bench/results.csv: ms/step (median over rounds of per-round medians, spread = half the range;
ratio = baseline time / variant time, against torch fused AdamW and against bitsandbytes) and state
bytes/param measured from the state tensors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, peak_rss_mib, time_fn  # noqa: E402

SD15_DIMS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
TEXT_DIM = 768


def shapes(case: str) -> list[tuple[int, ...]]:
    if case == "cd_kv":
        return [(d, TEXT_DIM) for d in SD15_DIMS for _ in ("to_k", "to_v")]
    if case.startswith("lora_r"):
        r = int(case[len("lora_r"):])
        out = []
        for d in SD15_DIMS:
            for _ in range(4):  # attn1 q, k, v, out: d -> d
                out += [(r, d), (d, r)]
            out += [(r, d), (d, r)]                      # attn2.to_q
            out += [(r, TEXT_DIM), (d, r)] * 2           # attn2.to_k, to_v
            out += [(r, d), (d, r)]                      # attn2.to_out.0
        return out
    raise ValueError(f"unknown case {case!r}")


def make_params(case: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes(case):
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k not in ("step", "qmap1", "qmap2"))


def build(variant: str, params):
    from t2i_fast.optim import AdamW8bit

    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    if variant == "native8bit":
        return AdamW8bit(params, backend="native", **kw)
    if variant == "native8bit_nocheck":
        return AdamW8bit(params, backend="native", nonfinite="off", **kw)
    if variant == "ref8bit":
        return AdamW8bit(params, backend="ref", **kw)
    if variant == "torch_fused_adamw":
        return torch.optim.AdamW(params, fused=True, **kw)
    if variant == "torch_foreach_adamw":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if variant == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    raise ValueError(variant)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="cd_kv,lora_r8")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (bitsandbytes and the twin run in one)")
    ap.add_argument("--no-bnb", action="store_true", help="leave out bitsandbytes (slow on the CPU)")
    ap.add_argument("--ref", action="store_true", help="also time the PyTorch twin")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from t2i_fast import native

    if not native.load():
        sys.exit("bench_optim: the native extension is not built; run `pip install --no-build-isolation -e .`")
    variants = ["torch_fused_adamw", "native8bit", "native8bit_nocheck"]
    if args.ref:
        variants.append("ref8bit")
    if not args.no_bnb:
        variants.append("bnb_adamw8bit")
    rows = []
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}  rounds={args.rounds}")
    for case in args.cases.split(","):
        params = make_params(case)
        n = sum(p.numel() for p in params)
        opts = {v: build(v, params) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        # Variants take turns, round after round, so that load from other processes hits all of them alike.
        for r in range(args.rounds):
            for v, opt in opts.items():
                slow = v in ("bnb_adamw8bit", "ref8bit")
                if slow and r > 0:
                    continue
                med, _ = time_fn(opt.step, warmup=1 if slow else 2, reps=3 if slow else args.reps)
                times[v].append(med)
        res = {}
        for v, opt in opts.items():
            ts = sorted(times[v])
            res[v] = (ts[len(ts) // 2], (ts[-1] - ts[0]) / 2, state_bytes(opt) / n)
        del opts
        base, bnb = res["torch_fused_adamw"][0], res.get("bnb_adamw8bit", (None,))[0]
        print(f"\n{case}: {n:,} params in {len(params)} tensors")
        for v, (med, spread, bpp) in res.items():
            vs_bnb = f"  {bnb / med:6.2f}x faster than bnb" if bnb else ""
            print(f"  {v:20s} {med * 1e3:9.2f} ms ±{spread * 1e3:6.2f}  {med / base:5.2f}x fused time{vs_bnb}"
                  f"  state {bpp:.3f} B/param")
            key = dict(bench="optim", case=f"{case}_{n}_t{torch.get_num_threads()}", variant=v)
            ms = dict(value=f"{med * 1e3:.3f}", spread=f"{spread * 1e3:.3f}", unit="ms")
            rows.append(dict(**key, **ms, metric="step_ms", baseline="torch_fused_adamw", ratio=f"{base / med:.3f}"))
            if bnb:
                rows.append(dict(**key, **ms, metric="step_ms_vs_bnb", baseline="bnb_adamw8bit",
                                 ratio=f"{bnb / med:.3f}"))
            rows.append(dict(**key, metric="state_bytes_per_param", value=f"{bpp:.4f}", spread="0", unit="B/param",
                             baseline="torch_fused_adamw", ratio=f"{res['torch_fused_adamw'][2] / bpp:.3f}"))
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    if not args.no_csv:
        append_results(rows)


if __name__ == "__main__":
    main()
