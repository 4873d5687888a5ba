"""Data-parallel training on the same cores: `t2i-fast train` under torchrun with 2 processes of 1 thread each,
against one process with 2 threads (the baseline: the same machine, used the ordinary way), at the same
global batch.

Both sides run the whole command on the `mid` test model (SD 1.5's topology, random weights, built in code),
LoRA on a concept folder of generated images, a fixed number of steps without early stopping, and no sample
grid. Seconds per step come from each run's log.jsonl (the time from the end of step --warmup to the last
step, over the steps in between), so start-up, caching and file writing are not counted; the command's whole
wall is printed beside them. The sides alternate which goes first, and every step's logged loss must agree
to 1e-4 (relative): the same training, not just the same speed. The adapters' largest difference (max
|a - b| / max |a| over the tensors) is printed too; after a few steps it is float rounding that Adam's first
updates amplify, as between one process at 1 and at 2 threads.

  python bench/bench_data_parallel.py [--steps 12] [--warmup 2] [--batch 4] [--resolution 128] [--rounds 2]

On a CPU each process's UNet step at half the batch is not half the work of the whole batch's (the UNet is
only partly parallel over a batch at one thread), and the gradient all-reduce costs a little, so expect less
than 2x; on GPUs each process has a device of its own (not measured here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_sides, append_results, ratio_row, side_medians  # noqa: E402

SIDES = ("2 processes", "1 process")
LOSS_TOL = 1e-4  # relative, per logged step: the same batches through the same weights


def run_side(side: str, args, work: Path) -> dict:
    """Train once as `side`; seconds per step (from log.jsonl), the command's wall, and the adapter."""
    from safetensors.torch import load_file

    from t2i_fast.formats import LORA_FILE

    out = work / side.replace(" ", "-")
    flags = ["train", "--model", str(args.model), "--images", str(args.images), "--token", "<sks>",
             "--class-word", "dog", "--method", "lora", "--resolution", str(args.resolution), "--batch-size",
             str(args.batch), "--max-steps", str(args.steps), "--early-stop", "none", "--num-samples", "0",
             "--no-progress", "--seed", "0", "--out", str(out), "--overwrite"]
    if side == "2 processes":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "t2i_fast.cli", *flags]
        threads = 1
    else:
        command, threads = [sys.executable, "-m", "t2i_fast.cli", *flags], 2
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_step = (log[-1]["time"] - log[args.warmup - 1]["time"]) / (len(log) - args.warmup)
    return {"step": per_step, "wall": wall, "losses": [row["loss"] for row in log],
            "adapter": load_file(out / LORA_FILE)}


def same_losses(a: dict, b: dict) -> bool:
    return len(a["losses"]) == len(b["losses"]) and all(
        abs(x - y) <= LOSS_TOL * abs(y) for x, y in zip(a["losses"], b["losses"]))


def difference(a: dict, b: dict) -> float:
    """max over the adapters' tensors of max |a - b| / max |a| (inf where they hold different tensors)."""
    x, y = a["adapter"], b["adapter"]
    if x.keys() != y.keys():
        return float("inf")
    return max(((x[k] - y[k]).abs().max() / x[k].abs().max().clamp(min=1e-12)).item() for k in x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--batch", type=int, default=4, help="the global batch (split over the 2 processes)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--size", default="mid", help="test model size (t2i_fast.testing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--csv", action="store_true", help="append the result to bench/results.csv")
    args = p.parse_args(argv)
    if args.batch % 2 or args.steps <= args.warmup or args.warmup < 1 or args.rounds < 1:
        p.error("--batch must be even, --warmup at least 1 and below --steps, --rounds at least 1")

    from t2i_fast.testing import save_pipeline, write_concept_images

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.model = save_pipeline(args.size, work / "model")
        args.images = write_concept_images(work / "concept", n=8, size=args.resolution)
        rounds = alternate_sides(
            args.rounds, SIDES, lambda side: run_side(side, args, work), same_losses,
            lambda a, b: f"2 processes {a['step']:.3f} s/step (wall {a['wall']:.1f} s), 1 process "
                         f"{b['step']:.3f} s/step (wall {b['wall']:.1f} s); losses agree, adapters differ by "
                         f"{difference(a, b):.1e}")
    if rounds is None:
        return 1
    steps, walls = side_medians(rounds, "step"), side_medians(rounds, "wall")
    two, one = steps["2 processes"], steps["1 process"]
    print(f"data parallel, {args.size} model, LoRA, global batch {args.batch} at {args.resolution} px, 2 cores: "
          f"2 processes x 1 thread {two:.3f} s/step, 1 process x 2 threads {one:.3f} s/step (medians of "
          f"{args.rounds} rounds): 2 processes / 1 process {two / one:.3f} (speed-up {one / two:.2f}x); whole "
          f"commands {walls['2 processes']:.1f} s vs {walls['1 process']:.1f} s")
    if args.csv:
        append_results([ratio_row("data_parallel", f"{args.size}_lora_b{args.batch}_{args.resolution}px",
                                  "2proc_x_1thread", "s_per_step", two, one, "s")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
