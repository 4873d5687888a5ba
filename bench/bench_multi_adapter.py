#!/usr/bin/env python
"""End-to-end: N distinct LoRA adapters, one image each, on the "mid" test model.

    ours      t2i_fast.sampling.MultiAdapterPipeline: the N adapters stacked once, then one batch of N images,
              one UNet pass per denoising step for all of them (gathered low-rank products)
    swap      what a service does today with diffusers: one StableDiffusionPipeline; for each adapter
              pipe.load_lora_weights(folder), generate 1 image, pipe.unload_lora_weights()

Both use build_pipeline's scheduler (DPMSolverMultistep), the same prompt, seeds, steps and guidance, and
produce the same images (checked: max |diff| printed). The adapters are random-weight LoRA files (ranks 4, 8,
16 in turn, on to_q/to_k/to_v/to_out.0) in the layout our trainer writes, loaded by the real loaders.

Timed per N: ours "warm" = generate only (adapters already stacked, a service's steady state); ours "cold" =
stacking the N adapters + generate; swap = the whole load/generate/unload loop (its loading is per image by
design). The default, --output latent, times the denoising (text encoding and the UNet loop, no VAE decode:
the decode costs the same per image on both sides and no adapter touches it); --output pil (or both) times
the whole call, decode included. Pin it on a shared machine:

    taskset -c 1 python bench/bench_multi_adapter.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, peak_rss_mib, sync  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPT = "a photo of a dog on the beach"
SWAP_SECONDS: list[float] = []  # load + unload seconds per adapter, per swap run


def write_lora(folder: Path, unet, rank: int, seed: int) -> Path:
    """A LoRA run folder as formats.save_lora writes it (scale folded into B), random non-zero weights."""
    from t2i_fast.formats import LORA_FILE, adapter_metadata, atomic_save

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) / rank ** 0.5 / 4
    folder.mkdir(parents=True)
    atomic_save(tensors, folder / LORA_FILE, adapter_metadata(None, "lora", {"rank": [rank]}))
    return folder


def run_swap(pipe, folders, args, output_type):
    """diffusers adapter swapping: load, generate 1 image, unload, per adapter."""
    from t2i_fast.formats import LORA_FILE

    from t2i_fast.notices import dropped

    size = args.resolution
    images, swapping = [], 0.0
    for i, folder in enumerate(folders):
        t0 = time.perf_counter()
        with dropped("diffusers.loaders.lora_base", "No LoRA keys associated to"):  # UNet-only file: a notice
            pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
        swapping += time.perf_counter() - t0
        images.append(pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, height=size,
                           width=size, num_images_per_prompt=1, generator=[torch.Generator("cpu").manual_seed(i)],
                           output_type=output_type).images[0])
        t0 = time.perf_counter()
        pipe.unload_lora_weights()
        swapping += time.perf_counter() - t0
    SWAP_SECONDS.append(swapping / len(folders))
    return images


def run_ours(multi, n, args, output_type):
    return multi.generate(PROMPT, adapters=list(range(n)), seeds=list(range(n)), steps=args.steps,
                          guidance=args.guidance, resolution=args.resolution, output_type=output_type)


def as_array(image) -> np.ndarray:
    """An image or latent of either side as float64 numpy (latents may be on the card)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
    return np.asarray(image, dtype=np.float64)


def timed(fn):
    sync()  # the kernels queued so far have run: the clock may be read
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def unet_ms_per_sample(pipe, batch: int, resolution: int, reps: int = 2) -> float:
    """The bare UNet forward (no adapter), ms per sample at `batch`: how much batching alone saves here."""
    latent = resolution // pipe.vae_scale_factor
    device = pipe.unet.device
    x = torch.randn(batch, pipe.unet.config.in_channels, latent, latent, device=device)
    ctx = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, device=device)
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        pipe.unet(x, t, ctx)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            pipe.unet(x, t, ctx)
        sync()
    return (time.perf_counter() - t0) / reps / batch * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid", help="tiny | mid | sd15 test model, or a model folder [mid]")
    p.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16], help="adapter counts [1 4 16]")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--output", choices=["pil", "latent", "both"], default="latent",
                   help="latent: the denoising alone; pil: with the VAE decode (slow on CPU) [latent]")
    p.add_argument("--rounds", type=int, default=1, help="timed runs of each variant per N (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (bench/gpu_suite.sh runs it on the card) [cpu]")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from t2i_fast.sampling import MultiAdapterPipeline, build_pipeline
    from t2i_fast.testing import SIZES, save_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_multi_adapter_"))
    model = save_pipeline(args.model, work / args.model) if args.model in SIZES else Path(args.model)
    device = args.device
    pipe = build_pipeline(model, device=device, progress=False)
    folders = [write_lora(work / f"lora{i}", pipe.unet, (4, 8, 16)[i % 3], i) for i in range(max(args.ns))]
    outputs = ["pil", "latent"] if args.output == "both" else [args.output]
    run_swap(pipe, folders[:1], args, "latent")  # warm-up: first-call costs (allocator, lazy imports)

    rows, lines = [], []
    for n in args.ns:
        cold, multi = timed(lambda: MultiAdapterPipeline(model, folders[:n], device=device))
        run_ours(multi, 1, args, "latent") if n == args.ns[0] else None  # warm-up of the routed layers
        for out in outputs:
            swap_t, ours_t = [], []
            for _ in range(args.rounds):
                t, ref = timed(lambda: run_swap(pipe, folders[:n], args, "np" if out == "pil" else out))
                swap_t.append(t)
                t, got = timed(lambda: run_ours(multi, n, args, "np" if out == "pil" else out))
                ours_t.append(t)
            err = max(float(np.abs(as_array(a) - as_array(b)).max()) for a, b in zip(got, ref))
            swap_s, ours_s = statistics.median(swap_t), statistics.median(ours_t)
            swap_ips, warm_ips, cold_ips = n / swap_s, n / ours_s, n / (ours_s + cold)
            lines.append(f"{n:>3}  {out:<6}  {swap_ips:10.3f}  {warm_ips:10.3f}  {cold_ips:10.3f}  "
                         f"{warm_ips / swap_ips:6.2f}x  {cold_ips / swap_ips:6.2f}x  {cold:7.2f}  "
                         f"{SWAP_SECONDS[-1]:7.2f}  {err:9.1e}")
            case = f"{args.model}-N{n}-{args.resolution}px-{args.steps}steps-{out}"
            rows += [dict(bench="multi_adapter", case=case, variant="swap", metric="images_per_s",
                          value=f"{swap_ips:.4f}", unit="img/s", baseline="swap", ratio="1.000"),
                     dict(bench="multi_adapter", case=case, variant="ours-warm", metric="images_per_s",
                          value=f"{warm_ips:.4f}", unit="img/s", baseline="swap", ratio=f"{warm_ips / swap_ips:.3f}"),
                     dict(bench="multi_adapter", case=case, variant="ours-cold", metric="images_per_s",
                          value=f"{cold_ips:.4f}", unit="img/s", baseline="swap", ratio=f"{cold_ips / swap_ips:.3f}")]
            print(lines[-1], flush=True)

    print(f"\nmodel {args.model}, {args.resolution}px, {args.steps} steps, guidance {args.guidance}, device {device}, "
          f"torch threads {torch.get_num_threads()}, peak RSS {peak_rss_mib():.0f} MiB")
    print("  N  output  swap img/s  ours(warm)  ours(cold)  warm/swap  cold/swap  stack s  swap s/ad  max|diff|")
    print("\n".join(lines))
    if not args.no_csv:
        append_results(rows)
    # the swap pipeline, every adapter unloaded: the plain base UNet
    per = {b: unet_ms_per_sample(pipe, b, args.resolution) for b in (2, 2 * max(args.ns))}
    print("bare UNet forward, ms per sample: " + ", ".join(f"batch {b}: {v:.1f}" for b, v in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
