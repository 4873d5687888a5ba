"""Two-stage personalization (Zeng, Suganuma & Okatani 2024).

Stage 1 (OUT/stage1): textual inversion of an identifier token written like an adjective before the class
noun ("a photo of <sks> dog"); nothing else trains.
Stage 2 (OUT/stage2): the UNet is fine-tuned, a LoRA by default or the whole UNet with --stage2-unet full,
with the stage-1 embedding added to the vocabulary frozen (--init-embeddings) and the text encoder frozen,
so text features are cached; there is no prior-preservation loss.

Each stage is an ordinary training run with its own step budget and learning rate (--stage1-steps/
--stage1-lr, --stage2-steps/--stage2-lr) and its own checkpoint, log and report; t2i_fast.train runs them
in a row (recipe.py), and resumes them with --resume. The combined files are then written at the top of OUT:
learned_embeds.safetensors plus pytorch_lora_weights.safetensors (or, with a full stage 2, a diffusers
pipeline folder whose tokenizer already holds the token), which load_adapter / `t2i-fast sample` load.
"""
from __future__ import annotations

from pathlib import Path

from .. import formats, run_folder
from ..config import TrainConfig
from ..data import INSTANCE_TEMPLATE
from ..errors import UserError
from .base import StagedMethod

STAGE2_METHODS = {"lora": "lora", "full": "dreambooth"}


class TwoStage(StagedMethod):
    name = "two_stage"
    # two trainings with their own budgets; max_steps is only their sum (for the report)
    defaults = dict(lr=1e-4, max_steps=1000, weight_decay=1e-2, stage1_steps=500, stage1_lr=5e-3,
                    stage2_steps=500, stage2_lr=1e-4)
    export_formats = ("kohya", "a1111")
    export_hints = {"kohya": " (its stage 2 trained the whole UNet, saved as a pipeline folder)"}
    families = ("sd1", "sd2", "sdxl")  # its stages' methods train all three

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.stage2_unet not in STAGE2_METHODS:
            raise UserError(f"--stage2-unet {cfg.stage2_unet!r} is not one of {', '.join(STAGE2_METHODS)}")
        for name in ("stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        if cfg.concepts:
            raise UserError("--concepts is not supported by two_stage (one concept per run); pass --images")
        if cfg.init_embeddings:
            raise UserError("two_stage learns its own embedding in stage 1; drop --init-embeddings")

    @classmethod
    def stages(cls, cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
        out = Path(cfg.out).expanduser()
        common = dict(template=cfg.template or INSTANCE_TEMPLATE, class_images=None, class_prompt=None,
                      train_text_encoder=False, train_token=False, num_samples=0, evaluate=False)
        # each stage's config leaves out the other stage's settings, so that changing stage 2's budget does not
        # make a finished stage 1 look stale on --resume (and retrain stage 2 from scratch)
        stage1 = cfg.replace(method="textual_inversion", out=str(out / "stage1"), max_steps=cfg.stage1_steps,
                             lr=cfg.stage1_lr, weight_decay=0.0, init_embeddings=None, stage2_steps=None,
                             stage2_lr=None, stage2_unet=TrainConfig.stage2_unet, **common)
        stage2 = cfg.replace(method=STAGE2_METHODS[cfg.stage2_unet], out=str(out / "stage2"),
                             max_steps=cfg.stage2_steps, lr=cfg.stage2_lr, stage1_steps=None, stage1_lr=None,
                             init_embeddings=str(out / "stage1" / formats.TI_FILE), **common)
        return [("stage1", stage1), ("stage2", stage2)]

    @classmethod
    def combine(cls, cfg: TrainConfig, out: Path, stage_folders: list[Path]) -> list[str]:
        stage1, stage2 = stage_folders
        files = [run_folder.publish(stage1 / formats.TI_FILE, out)]
        if cfg.stage2_unet == "lora":
            files.append(run_folder.publish(stage2 / formats.LORA_FILE, out))
        else:
            files += [run_folder.publish(stage2 / part, out) for part in formats.PIPELINE_PARTS]
        return files
