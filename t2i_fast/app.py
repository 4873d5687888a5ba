"""The app layer: what `t2i-fast train` adds on top of the library. Without --model or --images it trains the
bundled toy model on one of its example concepts (or, where the package ships no toy model, the tiny random
model built locally from testing.py) with the toy UNet's defaults (TOY_DEFAULTS), and scores the run with the
toy evaluator. The library itself (t2i_fast.train) needs a model and images and never imports toy/ or testing.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import run_folder
from .config import TrainConfig
from .recipe import train as train_library
from .runtime import cache_dir
from .trainer import TrainResult, write_report

# What the bundled 1M-parameter UNet needs instead of SD's defaults (fields the user left None). It learns at
# about 10x SD's rates; the token embedding rates (textual inversion, two-stage's first stage) are SD's.
# LoRA: batch 4, lr 1e-2 and a DVAR window of 60 steps (DVAR then stops at 60-65 steps). Chosen from
# `bench_toy_lr.py curves --lrs 8e-3 1e-2 1.2e-2 --flips 1 --batch-sizes 4 --points 50 65 85` (3 concepts x 4
# seeds, bench/quality/toy_lr_scout_w60_2026-12-06.jsonl): at 65 steps lr 1e-2 gained 0.260 ± 0.035 (preservation
# 0.825), lr 8e-3 0.227 ± 0.056, lr 1.2e-2 0.296 but preservation 0.788; then confirmed against the real script
# by bench_peer.py's 3 x 8 run (README, time to concept). Before that: lr 8e-3 and a window of 80, as below.
# On this model a step is mostly fixed per-step cost, so a
# batch of 4 costs 1.7x a batch of 1 (59 vs 35 ms on one core) and learns the concept in far fewer steps. From
# scouting sweeps (3 concepts x 2-4 seeds, below the 8 seeds a comparison needs: bench_peer.py's 3 x 8 run
# against the real script is the result): `python bench/bench_toy_lr.py curves --batch-sizes 4 --lrs 4e-3 8e-3
# 1.2e-2 --flips 1 --points 30 45 60 80 100`, subject-fidelity gain over the base model at batch 4: lr 8e-3
# 0.217 / 0.273 / 0.224 at 60 / 80 / 100 steps (preservation 0.84 / 0.85 / 0.83); lr 4e-3 0.191 at 80; lr
# 1.2e-2 0.292 at 80 but preservation 0.79. The former default, batch 1 at lr 4e-3 with a window of 200, gained
# 0.266 at 200 steps (4 seeds) and 0.235 at its DVAR stop (3 x 8 seeds), in twice the training time. On this
# model L_det drops within the first steps and then barely moves, so DVAR stops just after its window fills:
# `bench_toy_lr.py traces --batch-size 4 --lr 8e-3 --steps 150` replayed with N = 80 stops at 86 steps on
# average (84-90 over 12 traces), where the concept is learned.
# selfattn_copy (rank 8): lr 4e-3 and the window of 200 that LoRA had at batch 1, from `bench_toy_lr.py curves --method selfattn_copy --rank 8
# --lrs 1e-3 4e-3 1e-2 --flips 1 --seeds 0 1` (3 concepts x 2 seeds, scouting): gain 0.203 / 0.329 / 0.354 at
# 100 / 200 / 300 steps; lr 1e-3 0.271 at 200, lr 1e-2 0.174 ± 0.123 at 200 (unsteady). The sweep injected at
# every resolution (the copy-full ablation); the shipped layout was measured at the same lr (README).
# e4t (the shipped toy domain, pre-trained with --scale 0.5): lr 1e-3 from a scouting sweep on the --scale 1.0
# domain over 5 held-out concepts (`python bench/bench_e4t.py ablate --variants e4t-15 --seeds 0 1 [2 3] --lr LR
# --domain D`), subject fidelity 0.479 / 0.444 at lr 1e-3 / 3e-3 (4 seeds), 0.405 / 0.399 at 1e-2 / 3e-2 (seeds 0
# 1); preservation 0.92 at 1e-3 and 3e-3, 0.77 at 3e-2. The encoder's word carries the concept, and a larger lr
# tunes it away. The former domain (--scale 0.1), whose encoder learned nothing, needed lr 1e-2. 5 steps: on the
# shipped domain `bench_e4t.py ablate` (5 concepts x 4 seeds) gave gain 0.413 / 0.407 / 0.385 / 0.337 and prompt
# fidelity 0.900 / 0.916 / 0.947 / 0.956 at 15 / 10 / 5 / 1 steps: 5 keeps prompt fidelity and costs a third of
# 15. `bench_e4t.py compare` holds the measured result (README).
TOY_DEFAULTS = {"lora": {"lr": 1e-2, "dvar_window": 60, "batch_size": 4}, "custom_diffusion": {"lr": 1e-4},
                "dreambooth": {"lr": 5e-5}, "two_stage": {"stage2_lr": 1e-3},
                "selfattn_copy": {"lr": 4e-3, "dvar_window": 200}, "e4t": {"lr": 1e-3, "max_steps": 5}}


def _toy():
    try:
        from . import toy
    except ImportError:
        return None
    path = getattr(toy, "default_model_path", None)
    return toy if path is not None and (Path(path()) / "model_index.json").is_file() else None


def default_model() -> str:
    toy = _toy()
    if toy is not None:
        return str(toy.default_model_path())
    path = cache_dir() / "tiny-model"
    if not (path / "model_index.json").is_file():
        from .testing import save_pipeline

        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_pipeline("tiny", tmp)
        tmp.rename(path) if not path.exists() else None
    return str(path)


def is_default_model(model) -> bool:
    toy = _toy()
    return toy is not None and toy.is_bundled_model(model)


def default_concept() -> dict:
    """{"images": dir, "class_word": ..., "token": ...} of the bundled example concept."""
    toy = _toy()
    if toy is not None:
        name = toy.concepts()[0]
        c = toy.concept(name)
        return {"images": str(c.images_dir), "class_word": c.class_word, "token": c.token}
    path = cache_dir() / "tiny-concept"
    if not path.is_dir():
        from .testing import write_concept_images

        write_concept_images(path, n=4, size=64)
    return {"images": str(path), "class_word": "square", "token": "<sks>"}


def with_bundled_defaults(cfg: TrainConfig) -> TrainConfig:
    """The bundled model and concept where none is given (and the toy UNet's own defaults, TOY_DEFAULTS, and
    for e4t the shipped toy domain, with the bundled model); the library fills the method defaults after these."""
    changes = {}
    if cfg.model is None:
        changes["model"] = default_model()
        if is_default_model(changes["model"]):
            for name, value in TOY_DEFAULTS.get(cfg.method, {}).items():
                if getattr(cfg, name) is None:
                    changes[name] = value
    if cfg.method == "e4t" and cfg.domain is None and is_default_model(changes.get("model", cfg.model)):
        from .toy.e4t_domain import SHIPPED  # the toy domain pre-trained for the bundled model

        changes["domain"] = str(SHIPPED)
    if cfg.images is None:
        concept = default_concept()
        changes["images"] = concept["images"]
        if not cfg.class_word:
            changes["class_word"] = concept["class_word"]
        if cfg.token is None:  # not given: the example concept's own token (an explicit one is kept)
            changes["token"] = concept["token"]
    return cfg.replace(**changes)


def scores_with_toy_evaluator(cfg: TrainConfig) -> bool:
    """Whether a run is scored: --evaluate, the bundled model, one concept (the evaluator knows only its own)."""
    return cfg.evaluate and is_default_model(cfg.model) and not cfg.concepts


def add_toy_evaluation(cfg: TrainConfig, out: Path, report: dict, pipeline=None) -> None:
    """Score a finished run with the toy evaluator (a reduced setting: 4 images per prompt, 12 steps; eval.json)
    and add the scores to report.json. The library calls it once report.json is written (train's on_finished),
    with the sample grid's pipeline where it drew one: the evaluator generates with that instead of loading the
    run again."""
    from .toy.evaluator import EVAL_IMAGES, EVAL_STEPS, evaluate_run

    if cfg.progress:
        print("scoring the run with the toy evaluator ...", file=sys.stderr)
    try:
        report["eval"] = evaluate_run(out, n_images=EVAL_IMAGES, num_inference_steps=EVAL_STEPS, pipeline=pipeline)
    except KeyboardInterrupt:
        run_folder.remove_temporaries(out)
        print(f"\ninterrupted while scoring the run: the run is finished and saved in {out} ({run_folder.REPORT}, the "
              f"adapter), but {run_folder.EVAL} and the scores in {run_folder.REPORT} are missing; run "
              f"`t2i-fast eval {out}` to score it", file=sys.stderr)
        raise
    report["files"].append(run_folder.EVAL)
    write_report(out, report)


def train(cfg: TrainConfig) -> TrainResult:
    """`t2i-fast train`: the library's train with the bundled defaults filled in and, where the run trains the
    bundled model, the toy evaluator's scores added to its report."""
    cfg = with_bundled_defaults(cfg)
    return train_library(cfg, on_finished=add_toy_evaluation if scores_with_toy_evaluator(cfg) else None)
