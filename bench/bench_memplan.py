"""The memory planner (t2i_fast.memplan): how close its estimate is, what it says of the SD 1.5 and SDXL presets,
how long planning takes, and what each --vram switch costs in speed.

validate     for each configuration (method x switches x model size x precision): memplan.estimate on the CPU
             against memplan.measure, the same run with real weights, a real step and memtrack.TensorMemory;
             prints the ratio of the totals and of the traced step alone. The bf16 cases are the mixed-precision
             run built on the CPU (frozen modules bf16, the UNet under torch.autocast("cpu", bfloat16)) against
             the planner's emulation of autocast on the meta device with the CPU's op lists
presets      the plan on CUDA of each SD 1.5 preset at 512 px on an SD 1.5-shaped model and of the SDXL
             presets at 1024 px on an SDXL-base-shaped one (folders of configs only, configs_only_dir: the
             planner reads no weights), batch 1, in fp32 and in the run's mixed precision (auto: bf16), with
             the wall time of planning
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
    # mixed precision: the run as on CUDA, built on the CPU (memplan.measure(cfg, "bf16"))
    ("tiny", 32, dict(method="lora", precision="bf16")),
    ("tiny", 32, dict(method="dreambooth", precision="bf16")),
    ("mid", 128, dict(method="lora", precision="bf16")),
    ("mid", 128, dict(method="lora", gradient_checkpointing=True, optimizer="adamw8bit", precision="bf16")),
    ("mid", 128, dict(method="lora", cache_text=False, cache_latents=False, precision="bf16")),
    ("mid", 128, dict(method="textual_inversion", precision="bf16")),
    ("mid", 128, dict(method="custom_diffusion", precision="bf16")),
    ("mid", 128, dict(method="dreambooth", optimizer="adamw8bit", gradient_checkpointing=True, precision="bf16")),
]
PRESETS = ("sd15-lora", "sd15-lora-lowvram", "sd15-custom-diffusion", "sd15-dreambooth", "sd15-dreambooth-lowvram")
SDXL_PRESETS = ("sdxl-lora", "sdxl-lora-lowvram", "sdxl-ti", "sdxl-dreambooth-lowvram")

# SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0) as its config.json files give it: a UNet of
# 2,567,463,684 parameters, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, the SD VAE. Written here because a
# model of this size cannot be built with weights for a benchmark (10 GB in fp32), and the planner reads none.
SDXL_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768, hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")


def configs_only_dir(size: str) -> Path:
    """A diffusers folder of configs with the byte-level test tokenizers and empty weight files, for the planner,
    which builds the modules from the configs on the meta device (loading it with weights fails). size: "sd15"
    (testing.py's SD 1.5 sizes, as its random-weights model) or "sdxl-base" (SDXL_* above)."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    from t2i_fast.runtime import cache_dir
    from t2i_fast.testing import _scheduler, byte_level_clip_tokenizer, model_configs

    path = cache_dir() / "bench-models" / f"{size}-configs-only"
    if (path / "model_index.json").is_file():
        return path
    tokenizer = byte_level_clip_tokenizer()
    if size == "sd15":
        text, unet, vae = model_configs("sd15", len(tokenizer))
        texts = {"text_encoder": text}
    elif size == "sdxl-base":
        special = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
                       eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)  # the real vocabulary's size
        unet, vae = SDXL_UNET, SDXL_VAE
        texts = {"text_encoder": SDXL_TEXT | special, "text_encoder_2": SDXL_TEXT_2 | special}
    else:
        raise ValueError(f"size {size!r} is not sd15 or sdxl-base")
    empty = {"format": "pt", "note": "configs only: no weights (bench_memplan.configs_only_dir)"}
    with torch.device("meta"):
        for name, cls, config in (("unet", UNet2DConditionModel, unet), ("vae", AutoencoderKL, vae)):
            cls(**config).save_config(path / name)
            save_file({}, path / name / "diffusion_pytorch_model.safetensors", metadata=empty)
    for name, config in texts.items():
        CLIPTextConfig(**config).save_pretrained(path / name)
        save_file({}, path / name / "model.safetensors", metadata=empty)
    tokenizer.save_pretrained(path / "tokenizer")
    _scheduler().save_pretrained(path / "scheduler")
    index = {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if size == "sdxl-base":
        byte_level_clip_tokenizer(pad_token="!").save_pretrained(path / "tokenizer_2")
        index |= {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    else:
        index |= {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
                  "feature_extractor": [None, None], "requires_safety_checker": False}
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path


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
        changes = dict(changes)
        precision = changes.pop("precision", None)
        cfg = config(size, resolution, **changes)
        e, m = estimate(cfg, target="cpu", precision=precision), measure(cfg, precision)
        if precision:
            changes["precision"] = precision  # named in the case
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
    from t2i_fast import toy
    from t2i_fast.config import resolve_config
    from t2i_fast.memplan import GiB, estimate
    from t2i_fast.trainer import fill_defaults

    rows = []
    images = str(toy.concept("teal_ring").images_dir)  # the images only shape the batch
    print("| preset | model, px | switches | plan fp32 (GiB) | plan bf16 (GiB) | bf16: weights | bf16: step | "
          "bf16: probe pass | planning s (bf16) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, resolution, names in (("sd15", 512, PRESETS), ("sdxl-base", 1024, SDXL_PRESETS)):
        model = str(configs_only_dir(size))
        for name in names:
            cfg = resolve_config({"model": model, "images": images, "class_word": "shape", "device": "cuda",
                                  "out": str(Path(tempfile.mkdtemp()) / "run"), "progress": False}, name)
            fp32 = estimate(cfg.replace(mixed_precision="no"), target="cuda")
            t0 = time.perf_counter()
            plan = estimate(cfg, target="cuda")  # mixed precision auto: planned as bf16
            wall = time.perf_counter() - t0
            full = fill_defaults(cfg)  # the method's defaults where the preset leaves a field out
            switches = ", ".join([full.optimizer] + ["gradient checkpointing"] * full.gradient_checkpointing +
                                 [f"batch {full.batch_size}"] * (full.batch_size != 1) +
                                 [f"no {k}"for k in ("cache_latents", "cache_text") if not getattr(full, k)])
            print(f"| {name} | {size} {resolution} | {switches} | {fp32.total / GiB:.2f} | {plan.total / GiB:.2f} | "
                  f"{plan.get('weights') / GiB:.2f} | {plan.get('step') / GiB:.2f} | "
                  f"{plan.get('probe pass') / GiB:.2f} | {wall:.1f} |", flush=True)
            case = f"{size}-shaped-{resolution}px-{name}"
            for variant, value in (("estimate fp32", fp32.total / GiB), ("estimate bf16", plan.total / GiB)):
                rows.append({"bench": "memplan", "case": case, "variant": variant, "metric": "plan_gib",
                             "value": f"{value:.3f}", "unit": "GiB"})
            rows.append({"bench": "memplan", "case": case, "variant": "estimate bf16", "metric": "planning_s",
                         "value": f"{wall:.2f}", "unit": "s"})
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
