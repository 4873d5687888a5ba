"""Gradient all-reduce under data parallelism: overlapped with the backward pass (distributed.GradientAverager,
the default) against its plain twin, which all-reduces after it (T2I_FAST_OVERLAP_ALLREDUCE=0).

Each round starts W processes on the gloo backend (what torchrun starts on a CPU machine). Each trains the
whole UNet of the `mid` test model (SD 1.5's topology, 37.5M parameters, as DreamBooth does) on its own
random batch of one for a few steps: forward, backward with the averager armed, `finish`, plain SGD. The
step time is the slowest rank's, median over the steps after the first; the two sides alternate which goes
first. Both sides' averaged gradients of the last step must be equal (checked on rank 0 each round), so the
ratio compares the same result.

  python bench/bench_allreduce.py [--ranks 2] [--latent 16] [--steps 6] [--rounds 2] [--threads 1]

Reports each side's median step, the time from the end of backward to averaged gradients, and the ratio
overlapped / plain (< 1: overlapping is faster). On a CPU the all-reduce competes with the backward pass for
the same cores, so expect the gain to shrink as the compute per step grows (--latent); on GPUs the
all-reduce runs beside the compute (bench/gpu_suite.sh has no multi-GPU check: one GPU is lent at most).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_sides, append_results, ratio_row, run_ranks, side_medians  # noqa: E402

SIDES = ("overlapped", "plain")


def train_steps(rank: int, side: str, args) -> dict:
    """One rank of one side: time each step (forward, backward, gradients averaged) of the mid UNet."""
    os.environ["T2I_FAST_OVERLAP_ALLREDUCE"] = "1" if side == "overlapped" else "0"
    import torch
    import torch.distributed as td
    from diffusers import UNet2DConditionModel

    from t2i_fast import distributed as dist
    from t2i_fast.testing import model_configs

    torch.set_num_threads(args.threads)
    _, unet_cfg, _ = model_configs("mid")
    torch.manual_seed(0)  # the same weights on every rank
    unet = UNet2DConditionModel(**unet_cfg).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch, the same on both sides
    averager = dist.GradientAverager(params)
    steps, after = [], []
    try:
        for step in range(args.steps):
            latents = torch.randn(1, 4, args.latent, args.latent, generator=g)
            text = torch.randn(1, 77, unet_cfg["cross_attention_dim"], generator=g)
            t = torch.randint(0, 1000, (1,), generator=g)
            td.barrier()
            start = time.perf_counter()
            loss = unet(latents, t, text).sample.square().mean()
            averager.arm()
            loss.backward()
            backward_done = time.perf_counter()
            averager.finish(loss.item())
            done = time.perf_counter()
            if step == args.steps - 1:
                grads = torch.cat([p.grad.reshape(-1) for p in params])  # what both sides must agree on
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-1e-3)
                    p.grad = None
            took = torch.tensor([done - start, done - backward_done])
            td.all_reduce(took, op=td.ReduceOp.MAX)  # a step is over when the slowest rank has its gradients
            steps.append(took[0].item())
            after.append(took[1].item())
    finally:
        averager.close()
    return {"step": statistics.median(steps[1:]), "after": statistics.median(after[1:]), "grads": grads,
            "parameters": sum(p.numel() for p in params)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--latent", type=int, default=16, help="latent side (16: 128 px images)")
    p.add_argument("--steps", type=int, default=6, help="steps per side per round (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--csv", action="store_true", help="append the result to bench/results.csv")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.steps < 2 or args.rounds < 1 or args.latent < 8 or args.latent % 8:
        p.error("--ranks and --steps must be at least 2, --rounds at least 1, --latent a multiple of 8")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rounds = alternate_sides(
            args.rounds, SIDES, lambda side: run_ranks(train_steps, args.ranks, Path(tmp), side, args),
            lambda a, b: torch.equal(a["grads"], b["grads"]),
            lambda a, b: f"step overlapped {a['step']:.3f} s, plain {b['step']:.3f} s; after backward "
                         f"{a['after']:.3f} vs {b['after']:.3f} s (gradients equal)")
    if rounds is None:
        return 1
    steps, afters = side_medians(rounds, "step"), side_medians(rounds, "after")
    over, plain = steps["overlapped"], steps["plain"]
    parameters = rounds[0]["plain"]["parameters"]
    print(f"gradient all-reduce, {args.ranks} ranks, mid UNet ({parameters / 1e6:.1f}M parameters), latent "
          f"{args.latent}x{args.latent}, {args.threads} thread(s) per rank: step overlapped {over:.3f} s, plain "
          f"{plain:.3f} s (medians of {args.rounds} rounds); after backward {afters['overlapped']:.3f} vs "
          f"{afters['plain']:.3f} s: overlapped / plain {over / plain:.3f}")
    if args.csv:
        append_results([ratio_row("allreduce", f"{args.ranks}ranks_mid_latent{args.latent}", "overlapped",
                                  "step_s", over, plain, "s")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
