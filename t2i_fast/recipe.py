"""t2i_fast.train: one training of a Method (trainer.Trainer), or the trainings of a StagedMethod in a row.

A staged method (two_stage) declares its stages and how their files combine (methods/base.StagedMethod);
this module runs them, each an ordinary Trainer run in its own subfolder with its own checkpoint, log and
report, so all of them resume with --resume: a finished stage whose settings did not change is skipped,
an interrupted one continues from its checkpoint, and a stage after one that ran again starts afresh (its
input changed). Then the method combines the stages' files at the top of the output folder, and one
report covers them all. The training loop itself knows nothing of stages.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import __version__, distributed as dist, run_folder
from .config import TrainConfig, check_method_options
from .methods import check_family, get_method, with_defaults
from .methods.base import StagedMethod
from .models import peek_family
from .run_folder import CHECKPOINT, REPORT
from .runtime import resolve_device
from .trainer import OnFinished, Trainer, TrainResult, check_output, fill_defaults, hand_over, sample_grid


def train(cfg: TrainConfig | None = None, on_finished: OnFinished | None = None, *, fresh_components=None,
          **overrides) -> TrainResult:
    """Personalize cfg.model on cfg.images as `cfg` says and write the adapter, report, log and sample grid to
    cfg.out. on_finished(cfg, out, report, pipeline), where given, runs once report.json is written (it may add to
    the report and write it again with trainer.write_report; `pipeline` is the sample grid's, or None: see
    trainer.OnFinished): how the app plugs in an evaluator. fresh_components: where the caller holds the model in
    memory (train-many), a function returning an untouched copy of its models.Components for each training (a
    staged method trains several), instead of loading cfg.model from disk."""
    cfg = (cfg or TrainConfig()).replace(**overrides) if overrides or cfg is None else cfg
    check_method_options(cfg)
    if cfg.vram:  # fit the run to the budget before any weights are loaded; rank 0 alone says what it chose
        say = print if dist.launched_main() else (lambda *a: None)
        cfg, _ = plan_each_process(cfg, dist.launched_world(), say)
    method = get_method(cfg.method)
    if issubclass(method, StagedMethod):
        return run_stages(method, cfg, on_finished, fresh_components)
    return Trainer(cfg, on_finished, fresh_components() if fresh_components else None).run()


def plan_each_process(cfg: TrainConfig, processes: int, say=print):
    """(cfg, plan) of one of `processes` data-parallel processes: under torchrun or accelerate each device holds
    one process's slice of the global batch, so that share is what is planned, with the all-reduce's buffers;
    fitted to --vram where cfg has one (the switches it turns on, returned with the global batch again). `say`
    tells what the fit chose."""
    from .memplan import estimate, fit, parse_size, target_of

    batch = with_defaults(cfg).batch_size
    dist.check_batch(batch, processes)
    share = cfg.replace(batch_size=batch // processes) if processes > 1 else cfg
    target = target_of(share)
    if not cfg.vram:
        return cfg, estimate(share, target, processes=processes)
    per = f" (per process, {processes} processes)" if processes > 1 else ""
    fitted, plan = fit(share, parse_size(cfg.vram), target, say=lambda line: say(line + per), processes=processes)
    return fitted.replace(batch_size=cfg.batch_size), plan  # the global batch again (None: the method's)


def run_stages(method: type[StagedMethod], cfg: TrainConfig, on_finished: OnFinished | None = None,
               fresh_components=None) -> TrainResult:
    cfg = fill_defaults(cfg)
    check_family(method, cfg, peek_family(cfg.model))
    method.check(cfg)
    dist.check_batch(cfg.batch_size)
    out = Path(cfg.out).expanduser()
    check_output(out, cfg)
    with run_folder.write_errors(out):
        start = time.perf_counter()
        stages, results, ran = method.stages(cfg), [], False
        for name, sub in stages:
            folder = Path(sub.out)
            run_folder.recover(folder / CHECKPOINT)
            if cfg.resume and not ran and finished(folder, sub):
                results.append(result_from(folder))
                continue
            # a stage after one that ran again must start afresh: its input changed
            resume = cfg.resume and not ran and (folder / CHECKPOINT / "state.pt").is_file()
            trainer = Trainer(sub.replace(resume=resume, overwrite=cfg.overwrite or (cfg.resume and not resume)),
                              components=fresh_components() if fresh_components else None)
            if not results and cfg.overwrite and not cfg.resume:
                dist.barrier()  # every rank has checked --out before rank 0 changes it
                if dist.is_main():
                    run_folder.remove_ours(out)  # checked first (token, images, model): replace the previous run
            results.append(trainer.run())
            del trainer
            ran = True
        if not dist.is_main():  # rank 0 combines the stages and writes the report
            return dist.from_main(None)
        files = method.combine(cfg, out, [Path(r.out) for r in results])
        return dist.from_main(finish(cfg, out, stages, results, files, start, on_finished))


def finished(folder: Path, sub: TrainConfig) -> bool:
    """Whether the stage in `folder` finished with the settings `sub` asks for (then it is not run again)."""
    if not (folder / REPORT).is_file() or not (folder / CHECKPOINT / "state.pt").is_file():
        return False
    saved = json.loads((folder / REPORT).read_text()).get("config", {})
    return not run_folder.config_differences(saved, with_defaults(sub).to_dict(), free=run_folder.BOOKKEEPING)


def result_from(folder: Path) -> TrainResult:
    """The TrainResult of a finished stage, read back from its report and checkpoint."""
    report = json.loads((folder / REPORT).read_text())
    state = torch.load(folder / CHECKPOINT / "state.pt", map_location="cpu", weights_only=True)
    losses = list(state["losses"])
    return TrainResult(folder, report["steps"], losses, losses[-1] if losses else math.nan,
                       report["wall_time_s"], report["peak_memory_mb"], report["files"], report)


def finish(cfg: TrainConfig, out: Path, stages, results: list[TrainResult], files: list[str], start: float,
           on_finished: OnFinished | None) -> TrainResult:
    """The sample grid and the one report of the whole run, over the stages' reports."""
    reports = {name: r.report for (name, _), r in zip(stages, results)}
    last = reports[stages[-1][0]]
    grid_pipeline = sample_grid(cfg, out, last.get("resolution"), str(resolve_device(cfg.device)), files)
    losses = [x for r in results for x in r.losses]
    tail = results[-1].losses[-10:]
    report = {
        "version": __version__, "config": cfg.to_dict(), "method": cfg.method,
        "steps": sum(r.steps for r in results), "max_steps": sum(sub.max_steps for _, sub in stages),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "train_time_s": round(sum(r.get("train_time_s", 0.0) for r in reports.values()), 3),
        "final_loss": results[-1].losses[-1] if results[-1].losses else None,
        "mean_loss_last_10": sum(tail) / len(tail) if tail else None,
        "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in reports.values()),
        "device": last.get("device"), "dtype": last.get("dtype"), "resolution": last.get("resolution"),
        "files": files + [REPORT], "stages": reports,
        "early_stop": {name: r.get("early_stop") for name, r in reports.items()},
    }
    hand_over(cfg, out, report, grid_pipeline, on_finished)  # the combined files, once (not each stage)
    final = report["final_loss"]
    return TrainResult(out, report["steps"], losses, math.nan if final is None else final,
                       report["wall_time_s"], report["peak_memory_mb"], report["files"], report)
