"""The checks of bench/gpu_suite.sh written in Python: the kernels against their PyTorch twins on the device, and
the memory planner's estimate against the memory the run really takes there.

kernels  attention, the fused LoRA linear and the K/V delta, forward and backward, against their twins (fp32,
         and bf16 on CUDA); relative max error of outputs and gradients
planner  memplan.estimate against the run on the device: on CUDA torch.cuda.max_memory_allocated over a real
         step and probe pass (the plan less its stated margin and CUDA context, which the allocator does not
         see); on the CPU memplan.measure (TensorMemory)

    python bench/gpu_checks.py kernels --out kernels.json [--dry-run]
    python bench/gpu_checks.py planner --out planner.json [--dry-run]

--dry-run: tiny shapes and the tiny model on the CPU, so CI runs every line of it. Exit status 1 when a check
fails its tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # max |kernel - twin| / max |twin|
# (B, H, N, D) attention; (M, in, out, r) LoRA; (B, hidden, N, ctx) K/V delta
SHAPES = {"dry": {"attention": [(1, 2, 64, 32)], "lora": [(256, 64, 64, 4)], "kv": [(2, 64, 16, 32)]},
          "full": {"attention": [(2, 8, 4096, 40), (2, 10, 1024, 64), (2, 20, 256, 64)],
                   "lora": [(8192, 320, 320, 4), (2048, 640, 640, 16)],
                   "kv": [(2, 320, 77, 768), (2, 1280, 77, 768)]}}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def compare(fn, ref, inputs: list[torch.Tensor]) -> float:
    """Largest relative error of fn against ref over the output and every input's gradient."""
    errors = []
    outs = []
    for f in (fn, ref):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = f(*xs)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        outs.append((out.detach(), [x.grad for x in xs]))
    (o1, g1), (o2, g2) = outs
    errors.append(rel_error(o1, o2))
    errors += [rel_error(a, b) for a, b in zip(g1, g2) if a is not None and b is not None]
    return max(errors)


def kernels(device: torch.device, dry: bool) -> dict:
    from t2i_fast.kernels import attention, attention_ref, kv_delta, kv_delta_ref, lora_linear, lora_linear_ref

    import importlib

    # the Function itself at every shape, as the tests check it (small inputs would take the twin on the CPU)
    importlib.import_module("t2i_fast.kernels.lora_linear").SMALL_INPUT = 0
    shapes = SHAPES["dry" if dry else "full"]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    results = []
    for dtype in dtypes:
        on = lambda *ts: [t.to(device, dtype) for t in ts]  # noqa: E731
        for B, H, N, D in shapes["attention"]:
            err = compare(attention, attention_ref, on(rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)))
            results.append(("attention", f"{B}x{H}x{N}x{D}", dtype, err))
        for M, i, o, r in shapes["lora"]:
            x, w, b, a, bb = on(rand(M, i), rand(o, i) / i ** 0.5, rand(o), rand(r, i) / i ** 0.5, rand(o, r))
            err = compare(lambda *t: lora_linear(*t, 0.5), lambda *t: lora_linear_ref(*t, 0.5), [x, w, b, a, bb])
            results.append(("lora_linear", f"{M}x{i}x{o}x{r}", dtype, err))
        for B, hidden, N, ctx in shapes["kv"]:
            c, w, d = on(rand(B, N, ctx), rand(hidden, ctx) / ctx ** 0.5, rand(hidden, ctx) / ctx ** 0.5 * 0.1)
            results.append(("kv_delta", f"{B}x{hidden}x{N}x{ctx}", dtype, compare(kv_delta, kv_delta_ref, [c, w, d])))
    rows = [{"kernel": k, "shape": s, "dtype": str(d).replace("torch.", ""), "rel_error": e,
             "ok": e <= TOLERANCE[d]} for k, s, d, e in results]
    for r in rows:
        print(f"{r['kernel']:12} {r['shape']:>18} {r['dtype']:8} rel error {r['rel_error']:.2e} "
              f"{'ok' if r['ok'] else 'FAIL'}")
    return {"device": str(device), "rows": rows, "ok": all(r["ok"] for r in rows)}


def measured_on_cuda(cfg, components=None) -> int:
    """torch.cuda.max_memory_allocated over a real step and a real probe pass, the optimizer's state made.
    components: the model's modules where cfg.model holds configs only (their values do not matter here)."""
    from t2i_fast.optim import build_optimizer
    from t2i_fast.probe import build_probe_batch
    from t2i_fast.trainer import Trainer

    trainer = Trainer(cfg.replace(device="cuda", out=str(Path(tempfile.mkdtemp()) / "run"), progress=False),
                      components=components)
    batches = trainer._build_batches()
    opt = build_optimizer(cfg.optimizer, trainer.method.param_groups(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    trainer.comps.unet.train()
    trainer.method.train()
    trainer.loss(batches.draw(gen, cfg.batch_size)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    probe = build_probe_batch(batches, cfg.seed)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.loss(batches.draw(gen, cfg.batch_size)).backward()
    opt.zero_grad(set_to_none=True)
    trainer.comps.unet.eval()
    with torch.no_grad():
        trainer.loss(probe)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def planner(device: torch.device, dry: bool) -> dict:
    from bench_train import images_dir, model_dir

    from t2i_fast import TrainConfig
    from t2i_fast.memplan import estimate, measure

    lowvram = dict(gradient_checkpointing=True, optimizer="adamw8bit")
    # (model, resolution, case, changes, --mixed-precision): SD 1.5-shaped at 512 px and SDXL-base-shaped at
    # 1024 px, fp32 and bf16 (the dry run: the tiny models, bf16 as the CPU measures it, memplan.measure)
    if dry:
        cases = [("tiny", 32, "lora", {}, "no"), ("tiny", 32, "lora-lowvram", lowvram, "bf16"),
                 ("sdxl-tiny", 32, "lora-lowvram", lowvram, "bf16")]
    else:
        cases = [("sd15", 512, "lora", {}, "no"), ("sd15", 512, "lora-lowvram", lowvram, "bf16"),
                 ("sd15", 512, "dreambooth-lowvram", dict(method="dreambooth", **lowvram), "bf16"),
                 ("sdxl-base", 1024, "lora-lowvram", lowvram, "bf16")]
    rows = []
    for size, resolution, name, changes, precision in cases:
        components = None
        if size != "sdxl-base":
            model = model_dir(size)
        else:  # SDXL 1.0 base's configs; 2.6 B random values are not worth writing to disk
            from bench_memplan import configs_only_dir

            from t2i_fast.models import load_components

            model = configs_only_dir(size)
            components = load_components(model, weights=False)
            for module in (components.unet, components.vae, *components.text_encoders):
                module.to_empty(device="cuda")
        cfg = TrainConfig(model=str(model), images=str(images_dir(64)), class_word="shape",
                          resolution=resolution, num_samples=0, progress=False, mixed_precision=precision,
                          out=str(Path(tempfile.mkdtemp()) / "run"), **{"method": "lora", **changes})
        if device.type == "cuda":
            plan = estimate(cfg, target="cuda")
            planned = plan.total - plan.get("margin") - plan.get("CUDA context")  # what the allocator sees
            real = measured_on_cuda(cfg, components)
            del components
            torch.cuda.empty_cache()
        else:
            planned = estimate(cfg, target="cpu", precision=precision).total
            real = measure(cfg, precision=precision).total
        ratio = planned / real
        rows.append({"case": f"{size}-{resolution}px-{name}-{precision}", "planned_mib": planned / 2**20,
                     "measured_mib": real / 2**20, "ratio": ratio, "ok": abs(ratio - 1) <= 0.10})
        print(f"{rows[-1]['case']:28} planned {planned / 2**20:9.1f} MiB measured {real / 2**20:9.1f} MiB "
              f"ratio {ratio:.3f} {'ok' if rows[-1]['ok'] else 'FAIL (target 10%)'}")
    return {"device": str(device), "rows": rows, "ok": all(r["ok"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["kernels", "planner"])
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, on the CPU")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    result = {"kernels": kernels, "planner": planner}[args.part](device, args.dry_run)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
