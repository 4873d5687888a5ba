"""The memory planner (t2i_fast.memplan): how close its estimate is, what it says of the SD 1.5 presets, how long
planning takes, and what each --vram switch costs in speed.

validate     for each configuration (method x switches x model size): memplan.estimate on the CPU against
             memplan.measure, the same run with real weights, a real step and memtrack.TensorMemory; prints the
             ratio of the totals and of the traced step alone
presets      the plan on CUDA of each SD 1.5 preset at 512 px, batch 1, on an SD 1.5-shaped model (random
             weights; the planner reads none), with the wall time of planning
switch-cost  s/step on the mid model with each switch that --vram may turn on, against the run without it
             (alternating, median of --rounds): the order of memplan.SWITCHES

    python bench/bench_memplan.py validate
    python bench/bench_memplan.py presets
    python bench/bench_memplan.py switch-cost --rounds 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternated_medians, append_results  # noqa: E402

# (model size, resolution, changes to the TrainConfig)
VALIDATE = [
    ("tiny", 32, dict(method="lora")),
    ("tiny", 32, dict(method="textual_inversion")),
    ("tiny", 32, dict(method="custom_diffusion", freeze_model="crossattn")),
    ("tiny", 32, dict(method="dreambooth", optimizer="adamw8bit")),
    ("mid", 128, dict(method="lora")),
    ("mid", 128, dict(method="lora", gradient_checkpointing=True)),
    ("mid", 128, dict(method="lora", optimizer="adamw8bit", cache_text=False, cache_latents=False)),
    ("mid", 128, dict(method="lora", train_text_encoder=True, batch_size=2)),
    ("mid", 128, dict(method="textual_inversion")),
    ("mid", 128, dict(method="custom_diffusion")),
    ("mid", 128, dict(method="dreambooth", optimizer="adamw8bit", gradient_checkpointing=True)),
    ("mid", 128, dict(method="selfattn_copy")),
]
PRESETS = ("sd15-lora", "sd15-lora-lowvram", "sd15-custom-diffusion", "sd15-dreambooth", "sd15-dreambooth-lowvram")


def config(size: str, resolution: int, **changes):
    from bench_train import images_dir, model_dir

    from t2i_fast import TrainConfig

    return TrainConfig(model=str(model_dir(size)), images=str(images_dir(64)), class_word="shape",
                       resolution=resolution, out=str(Path(tempfile.mkdtemp()) / "run"), num_samples=0,
                       progress=False, mixed_precision="no", **changes)


def validate(args) -> list[dict]:
    from t2i_fast.memplan import estimate, measure

    rows, ratios = [], []
    print("| model | config | estimate MiB | measured MiB | total ratio | step estimate / measured MiB | step ratio |")
    print("|---|---|---|---|---|---|---|")
    for size, resolution, changes in VALIDATE:
        cfg = config(size, resolution, **changes)
        e, m = estimate(cfg, target="cpu"), measure(cfg)
        total, step = e.total / m.total, e.get("step") / m.get("step")
        ratios.append((total, step))
        case = f"{size}-{resolution}px-" + "-".join(f"{k}={v}" for k, v in changes.items())
        print(f"| {size} {resolution} px | {' '.join(f'{k}={v}' for k, v in changes.items())} | "
              f"{e.total / 2**20:.1f} | {m.total / 2**20:.1f} | {total:.3f} | {e.get('step') / 2**20:.1f} / "
              f"{m.get('step') / 2**20:.1f} | {step:.3f} |")
        rows += [{"bench": "memplan", "case": case, "variant": "estimate/measured", "metric": metric,
                  "value": f"{value:.4f}", "unit": "ratio"} for metric, value in (("total", total), ("step", step))]
    worst = max(max(abs(t - 1), abs(s - 1)) for t, s in ratios)
    print(f"{len(ratios)} configurations: worst |estimate / measured - 1| = {worst:.1%} (target <= 10%)")
    return rows


def presets(args) -> list[dict]:
    from bench_train import model_dir

    from t2i_fast import toy
    from t2i_fast.config import resolve_config
    from t2i_fast.memplan import GiB, estimate

    rows = []
    model = str(model_dir("sd15"))
    images = str(toy.concept("teal_ring").images_dir)  # the images only shape the batch
    print("| preset | switches | plan on CUDA, fp32 (GiB) | of which weights | step | planning s |")
    print("|---|---|---|---|---|---|")
    for name in PRESETS:
        cfg = resolve_config({"model": model, "images": images, "class_word": "shape", "device": "cuda",
                              "out": str(Path(tempfile.mkdtemp()) / "run"), "progress": False}, name)
        t0 = time.perf_counter()
        plan = estimate(cfg, target="cuda")
        wall = time.perf_counter() - t0
        switches = ", ".join(k for k in ("gradient_checkpointing", "cache_latents") if getattr(cfg, k)) or "-"
        print(f"| {name} | {cfg.optimizer}, {switches} | {plan.total / GiB:.2f} | {plan.get('weights') / GiB:.2f} | "
              f"{plan.get('step') / GiB:.2f} | {wall:.1f} |")
        rows.append({"bench": "memplan", "case": f"sd15-shaped-512px-{name}", "variant": "estimate",
                     "metric": "plan_gib", "value": f"{plan.total / GiB:.3f}", "unit": "GiB"})
        rows.append({"bench": "memplan", "case": f"sd15-shaped-512px-{name}", "variant": "estimate",
                     "metric": "planning_s", "value": f"{wall:.2f}", "unit": "s"})
    return rows


def switch_cost(args) -> list[dict]:
    import torch

    from bench_selfattn_copy import step_setup
    from bench_train import images_dir, model_dir

    torch.set_num_threads(args.threads)
    model, images = str(model_dir("mid")), str(images_dir(args.resolution))
    sides = {"as given": {}, "optimizer adamw8bit": {"optimizer": "adamw8bit"},
             "gradient checkpointing": {"gradient_checkpointing": True}}
    steps = {}
    for name, changes in sides.items():
        _, step, _ = step_setup(model, "lora", 4, args.resolution, images, Path(tempfile.mkdtemp()) / "run", **changes)
        step()
        steps[name] = step
    medians = alternated_medians(steps, args.rounds, args.steps)
    base = medians["as given"]
    rows = []
    for name in sides:
        med = medians[name]
        print(f"{name}: {med * 1e3:.0f} ms/step (median of {args.rounds}) = {med / base:.2f}x")
        rows.append({"bench": "memplan", "case": f"mid-{args.resolution}px-lora-r4-switch-cost", "variant": name,
                     "metric": "s_per_step", "value": f"{med:.4f}", "unit": "s"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["validate", "presets", "switch-cost"])
    p.add_argument("--resolution", type=int, default=256, help="switch-cost: resolution on the mid model")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    rows = {"validate": validate, "presets": presets, "switch-cost": switch_cost}[args.part](args)
    if not args.no_csv:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
