"""Ablation of our training step against our own emulation of the diffusers scripts' step, same run.

This is not the diffusers script: bench_peer.py runs the real train_dreambooth_lora.py, the baseline the
README quotes speed-ups against. What this ablation still shows is what our step saves over a loop that does
the script's work in-process: cached latents and text features off, peft's layers instead of ours.

(a) ours: t2i_fast's trainer, latents and text features cached, our LoRA layers and kernels;
(b) emulated script step: VAE encode and text encoder on every step, peft's LoRA layers (unet.add_adapter),
    the default SDPA attention processor, torch AdamW.
Both at batch 1, LoRA rank 4, on the same model and images. Each variant runs in its own process so its
peak memory (peak RSS on the CPU, max allocated on CUDA) is its own. Prints seconds per step, the speed-up
and the memory ratio, and appends rows to bench/results.csv.

  python bench/bench_train.py --model mid --resolution 256 --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402


def model_dir(size: str) -> Path:
    """A tiny/mid/sd15 model built once into the cache (or an existing model folder, used as it is)."""
    if Path(size).is_dir():
        return Path(size)
    from t2i_fast.runtime import cache_dir
    from t2i_fast.testing import save_pipeline

    path = cache_dir() / "bench-models" / size
    if not (path / "model_index.json").is_file():
        save_pipeline(size, path)
    return path


def images_dir(resolution: int) -> Path:
    from t2i_fast.runtime import cache_dir
    from t2i_fast.testing import write_concept_images

    path = cache_dir() / "bench-images" / str(resolution)
    if not path.is_dir():
        write_concept_images(path, n=4, size=resolution)
    return path


def peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_trainer(cfg, warmup: int, steps: int) -> dict:
    """Run t2i_fast's trainer for warmup + steps steps; seconds per step from its log (after warm-up)."""
    from t2i_fast.trainer import Trainer

    trainer = Trainer(cfg.replace(max_steps=warmup + steps, log_every=1, num_samples=0, progress=False,
                                  overwrite=True, early_stop="none"))
    result = trainer.run()
    times = [json.loads(x)["time"] for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    per_step = (times[-1] - times[warmup - 1]) / steps
    return {"s_per_step": per_step, "peak_mb": peak_mb(trainer.device), "final_loss": result.final_loss}


def time_loop(step, warmup: int, steps: int, device) -> dict:
    """Call step(i) warmup times, then time `steps` calls; step returns the loss."""
    import torch

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"s_per_step": (time.perf_counter() - t0) / steps, "peak_mb": peak_mb(device), "final_loss": loss}


def run_ours(args) -> dict:
    import tempfile

    from t2i_fast import TrainConfig

    cfg = TrainConfig(model=str(model_dir(args.model)), images=str(images_dir(args.resolution)), method=args.method,
                      class_word="dog", out=tempfile.mkdtemp(prefix="bench-ours-"), resolution=args.resolution,
                      lora_rank=4, kernels=not args.no_kernels)
    return time_trainer(cfg, args.warmup, args.steps)


def run_diffusers(args) -> dict:
    """Our emulation of diffusers' train_dreambooth_lora.py's step (not the script: see bench_peer.py)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from t2i_fast.data import ConceptImages, tokenize
    from t2i_fast.models import load_components

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps = load_components(model_dir(args.model))
    unet, vae, te = comps.unet.to(device), comps.vae.to(device), comps.text_encoder.to(device)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = ConceptImages(images_dir(args.resolution), args.resolution)
    ids = tokenize(comps.tokenizer, ["a photo of sks dog"]).to(device)
    sched = comps.scheduler
    gen = torch.Generator().manual_seed(0)
    unet.train()

    def step(i):
        pixels = images.pixels(i % len(images), 0)[None].to(device)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(sched.config.num_train_timesteps, (1,), generator=gen).to(device)
        with torch.no_grad():
            text = te(ids)[0]
        pred = unet(sched.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return time_loop(step, args.warmup, args.steps, device)


def compare_variants(script: str, args, size: str, flags: list[str], label: str, case: str) -> list[dict] | None:
    """Run `script --variant diffusers|ours` in child processes (each its own peak memory), alternating the
    two `args.rounds` times so that load drifting on a shared machine hits both; print the median of the
    per-round speed-ups and their range; return the results.csv rows (None if a child failed)."""
    runs: dict[str, list[dict]] = {"diffusers": [], "ours": []}
    for _ in range(args.rounds):
        for variant in ("diffusers", "ours"):
            cmd = [sys.executable, script, "--variant", variant, "--model", size, "--resolution",
                   str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup), *flags]
            cmd += ["--no-kernels"] if args.no_kernels else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return None
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    speedups = [b["s_per_step"] / a["s_per_step"] for a, b in zip(runs["ours"], runs["diffusers"])]
    speedup = statistics.median(speedups)
    a_s, b_s = (statistics.median(r["s_per_step"] for r in runs[v]) for v in ("ours", "diffusers"))
    a_mb, b_mb = (max(r["peak_mb"] for r in runs[v]) for v in ("ours", "diffusers"))
    mem = a_mb / b_mb
    spread = (max(speedups) - min(speedups)) / 2
    print(f"{size:5s} {args.resolution}px {label}: ours {a_s:.3f} s/step, emulated script step {b_s:.3f} s/step "
          f"(medians of {args.rounds}) -> {speedup:.2f}x faster (per-round {min(speedups):.2f}-{max(speedups):.2f}x); "
          f"peak memory ours {a_mb:.0f} MB vs {b_mb:.0f} MB ({mem:.2f}x)")
    return [
        {"bench": "train_step", "case": case, "variant": "ours", "metric": "s_per_step", "value": f"{a_s:.4f}",
         "spread": f"{spread:.3f}", "unit": "s", "baseline": "emulated-script", "ratio": f"{speedup:.3f}"},
        {"bench": "train_step", "case": case, "variant": "emulated-script", "metric": "s_per_step",
         "value": f"{b_s:.4f}", "unit": "s"},
        {"bench": "train_step", "case": case, "variant": "ours", "metric": "peak_mb",
         "value": f"{a_mb:.0f}", "unit": "MB", "baseline": "emulated-script", "ratio": f"{mem:.3f}"},
        {"bench": "train_step", "case": case, "variant": "emulated-script", "metric": "peak_mb",
         "value": f"{b_mb:.0f}", "unit": "MB"},
    ]


def step_bench_parser(doc: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every ours-vs-diffusers step benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "mid", "sd15"], nargs="+", default=["mid"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (at least 1)")
    p.add_argument("--rounds", type=int, default=3, help="diffusers/ours pairs, alternated; the median ratio is reported")
    p.add_argument("--no-kernels", action="store_true", help="our step with the plain PyTorch twins")
    p.add_argument("--variant", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    return p


def run_step_bench(args, script: str, run_ours, run_diffusers, prepare, flags: list[str], label: str,
                   case) -> int:
    """As a child (--variant): run one variant on one model and print its JSON as the last line. Otherwise:
    for each --model, prepare(size) outside the timed children, compare the two variants under the name
    case(size), and append the rows to bench/results.csv."""
    if args.warmup < 1 or args.rounds < 1 or args.steps < 1:
        raise SystemExit("--warmup, --steps and --rounds must be at least 1")
    if args.variant:
        args.model = args.model[0]
        res = run_ours(args) if args.variant == "ours" else run_diffusers(args)
        print(json.dumps(res))
        return 0
    rows = []
    for size in args.model:
        prepare(size)
        found = compare_variants(script, args, size, flags, label, case(size))
        if found is None:
            return 1
        rows += found
    if not args.no_csv:
        append_results(rows)
    return 0


def main(argv=None) -> int:
    p = step_bench_parser(__doc__, steps=4, warmup=2)
    p.add_argument("--method", default="lora", help="our method (the baseline is always the diffusers LoRA step)")
    args = p.parse_args(argv)
    return run_step_bench(args, __file__, run_ours, run_diffusers,
                          prepare=lambda size: (model_dir(size), images_dir(args.resolution)),
                          flags=["--method", args.method], label=args.method,
                          case=lambda size: f"{size}-{args.resolution}px-{args.method}-b1-r4"
                                            + ("-nokernels" if args.no_kernels else ""))


if __name__ == "__main__":
    sys.exit(main())
