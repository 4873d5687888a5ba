#!/usr/bin/env python
"""What train-many pays per concept for a fresh model: a reload from disk (models.load_components, the
baseline) against a copy of the one already in memory (copy.deepcopy of its Components, what train-many does),
on the test models built in code. Seconds per call, median over rounds in which both alternate; the page cache
is warm, which is the reload's best case. Pin it on a shared machine:

    taskset -c 1 python bench/bench_train_many.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternated_medians, append_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "mid"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from t2i_fast.models import load_components
    from t2i_fast.testing import save_pipeline

    rows = []
    print(f"{'model':>6} {'params':>8} {'reload s':>9} {'copy s':>8} {'copy/reload':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.models:
            folder = save_pipeline(size, Path(tmp) / size)
            pristine = load_components(folder)
            params = sum(p.numel() for m in (pristine.unet, pristine.vae, pristine.text_encoder)
                         for p in m.parameters())
            s = alternated_medians({"reload": lambda: load_components(folder),
                                    "copy": lambda: copy.deepcopy(pristine)}, rounds=args.rounds, calls=1)
            ratio = s["copy"] / s["reload"]
            print(f"{size:>6} {params / 1e6:>7.1f}M {s['reload']:>9.3f} {s['copy']:>8.3f} {ratio:>11.2f}x")
            case = f"{size}-{params / 1e6:.0f}M-params"
            rows += [dict(bench="train_many", case=case, variant="reload", metric="s_per_model",
                          value=f"{s['reload']:.4f}", unit="s", baseline="reload", ratio="1.000"),
                     dict(bench="train_many", case=case, variant="deepcopy", metric="s_per_model",
                          value=f"{s['copy']:.4f}", unit="s", baseline="reload", ratio=f"{ratio:.3f}")]
    if not args.no_csv:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
