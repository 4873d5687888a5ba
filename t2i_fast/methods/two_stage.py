"""Two-stage personalization (Zeng, Suganuma & Okatani 2024).

Stage 1 (OUT/stage1): textual inversion of an identifier token written like an adjective before the class
noun ("a photo of <sks> dog"); nothing else trains.
Stage 2 (OUT/stage2): the UNet is fine-tuned, a LoRA by default or the whole UNet with --stage2-unet full,
with the stage-1 embedding added to the vocabulary frozen (--init-embeddings) and the text encoder frozen,
so text features are cached; there is no prior-preservation loss.

Each stage is an ordinary training run (trainer.Trainer) with its own step budget and learning rate
(--stage1-steps/--stage1-lr, --stage2-steps/--stage2-lr) and its own checkpoint, log and report, so both
resume with --resume: a finished stage whose settings did not change is skipped, an interrupted one
continues from its checkpoint, and a stage after one that ran again starts afresh. trainer.train() runs
them through TwoStage.run_stages. The combined files are then written at the top of OUT:
learned_embeds.safetensors plus pytorch_lora_weights.safetensors (or, with a full stage 2, a diffusers
pipeline folder whose tokenizer already holds the token), which load_adapter / `t2i-fast sample` load.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from .. import formats, run_folder
from ..config import TrainConfig
from ..data import INSTANCE_TEMPLATE
from ..errors import UserError
from ..runtime import resolve_device
from .base import Method

STAGE2_METHODS = {"lora": "lora", "full": "dreambooth"}


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # same file system: no second copy of a UNet on disk
    except OSError:
        shutil.copy2(src, dst)


def publish(src: Path, out: Path) -> str:
    """Place the file or folder `src` at out/src.name under a temporary name, then rename it there."""
    target = out / src.name
    tmp = out / (src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        if target.is_dir():
            shutil.rmtree(target)
    else:
        _link_or_copy(src, tmp)
    os.replace(tmp, target)
    return src.name


class TwoStage(Method):
    name = "two_stage"
    uses_prior = False

    def __init__(self, cfg, concepts=()):
        raise UserError("method two_stage is two trainings in a row; start it with t2i_fast.train(cfg) or "
                        "`t2i-fast train --method two_stage`, not with Trainer(cfg)")

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        if cfg.stage2_unet not in STAGE2_METHODS:
            raise UserError(f"--stage2-unet {cfg.stage2_unet!r} is not one of {', '.join(STAGE2_METHODS)}")
        for name in ("stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        if cfg.concepts:
            raise UserError("--concepts is not supported by two_stage (one concept per run); pass --images")
        if cfg.init_embeddings:
            raise UserError("two_stage learns its own embedding in stage 1; drop --init-embeddings")

    @staticmethod
    def stages(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
        """(name, config) of each stage; each trains into OUT/name."""
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
    def run_stages(cls, cfg: TrainConfig, on_finished=None):
        from ..trainer import check_output, fill_defaults

        cfg = fill_defaults(cfg)
        cls.check(cfg)
        out = Path(cfg.out).expanduser()
        check_output(out, cfg)
        with run_folder.write_errors(out):
            return cls._run_stages(cfg, out, on_finished)

    @classmethod
    def _run_stages(cls, cfg: TrainConfig, out: Path, on_finished):
        from ..trainer import CHECKPOINT, Trainer

        start = time.perf_counter()
        stages, results, ran = cls.stages(cfg), [], False
        for name, sub in stages:
            folder = Path(sub.out)
            run_folder.recover(folder / CHECKPOINT)
            if cfg.resume and not ran and cls._finished(folder, sub):
                results.append(cls._result_from(folder))
                continue
            # a stage after one that ran again must start afresh: its input embedding changed
            resume = cfg.resume and not ran and (folder / CHECKPOINT / "state.pt").is_file()
            trainer = Trainer(sub.replace(resume=resume, overwrite=cfg.overwrite or (cfg.resume and not resume)))
            if not results and cfg.overwrite and not cfg.resume:
                run_folder.remove_ours(out)  # checked first (token, images, model): replace the previous run
            results.append(trainer.run())
            del trainer
            ran = True
        return cls._finish(cfg, out, stages, results, start, on_finished)

    @staticmethod
    def _finished(folder: Path, sub: TrainConfig) -> bool:
        from ..trainer import CHECKPOINT, REPORT

        if not (folder / REPORT).is_file() or not (folder / CHECKPOINT / "state.pt").is_file():
            return False
        saved = json.loads((folder / REPORT).read_text()).get("config", {})
        return not run_folder.config_differences(saved, sub.resolved().to_dict(), free=run_folder.BOOKKEEPING)

    @staticmethod
    def _result_from(folder: Path):
        from ..trainer import CHECKPOINT, REPORT, TrainResult

        report = json.loads((folder / REPORT).read_text())
        state = torch.load(folder / CHECKPOINT / "state.pt", map_location="cpu", weights_only=True)
        losses = list(state["losses"])
        return TrainResult(folder, report["steps"], losses, losses[-1] if losses else math.nan,
                           report["wall_time_s"], report["peak_memory_mb"], report["files"], report)

    @staticmethod
    def _finish(cfg: TrainConfig, out: Path, stages, results, start: float, on_finished):
        from .. import __version__
        from ..trainer import REPORT, TrainResult, sample_grid, write_report

        stage1, stage2 = (Path(r.out) for r in results)
        files = [publish(stage1 / formats.TI_FILE, out)]
        if cfg.stage2_unet == "lora":
            files.append(publish(stage2 / formats.LORA_FILE, out))
        else:
            files += [publish(stage2 / part, out) for part in formats.PIPELINE_PARTS]
        reports = {name: r.report for (name, _), r in zip(stages, results)}
        last = reports[stages[-1][0]]
        if cfg.num_samples > 0:
            files.append(sample_grid(cfg, out, last.get("resolution"), str(resolve_device(cfg.device))))
        losses = [x for r in results for x in r.losses]
        tail = results[-1].losses[-10:]
        report = {
            "version": __version__, "config": cfg.to_dict(), "method": cfg.method,
            "steps": sum(r.steps for r in results), "max_steps": cfg.stage1_steps + cfg.stage2_steps,
            "wall_time_s": round(time.perf_counter() - start, 3),
            "train_time_s": round(sum(r.get("train_time_s", 0.0) for r in reports.values()), 3),
            "final_loss": results[-1].losses[-1] if results[-1].losses else None,
            "mean_loss_last_10": sum(tail) / len(tail) if tail else None,
            "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in reports.values()),
            "device": last.get("device"), "dtype": last.get("dtype"), "resolution": last.get("resolution"),
            "files": files + [REPORT], "stages": reports,
            "early_stop": {name: r.get("early_stop") for name, r in reports.items()},
        }
        write_report(out, report)
        if on_finished is not None:
            on_finished(cfg, out, report)  # the combined files, once (not each stage)
        final = report["final_loss"]
        return TrainResult(out, report["steps"], losses, math.nan if final is None else final,
                           report["wall_time_s"], report["peak_memory_mb"], report["files"], report)
