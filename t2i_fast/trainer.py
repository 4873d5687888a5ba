"""The training loop: step, accumulation, optimizer, schedule, checkpoint/resume, progress, logging.

It knows nothing about any one method: methods/ decides which parameters train and what is saved.
Everything a user can get wrong (folders, images, model, token, resolution, output folder) is checked
before the output folder is touched, so a bad run leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, distributed as dist, run_folder
from .batches import BatchSource
from .config import TrainConfig, check_values
from .class_images import class_image_folders
from .concepts import build_streams, load_concepts
from .data import format_prompt
from .diffusion import diffusion_loss
from .errors import UserError
from .formats import atomic_save, read_safetensors
from .kernels._dispatch import kernels_enabled, use_kernels
from .methods import check_family, get_method, with_defaults
from .methods.base import Method
from .models import load_components, peek_family
from .optim import OPTIMIZERS, all_finite, build_optimizer
from .run_folder import CHECKPOINT, CHECKPOINT_CONFIG, GRID, LOG, REPORT
from .runtime import check_resolution, peak_memory_mb, resolve_device, resolve_precision
from .stopping import EarlyStopper, settings_from_config

# on_finished(cfg, out, report, pipeline): runs once report.json is written. `pipeline` is the sample grid's (the
# base model with the run's adapter loaded through diffusers' loaders, a LoRA folded in), or None where no grid
# was drawn: an evaluator can generate with it instead of loading the run a second time.
OnFinished = Callable[[TrainConfig, Path, dict, object], None]
BEST_STATE = "best.safetensors"  # in the checkpoint: the trainable state at the lowest L_det (--save-best)


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float]
    final_loss: float
    wall_time: float
    peak_memory_mb: float
    files: list[str]
    report: dict = field(default_factory=dict)


def lr_lambda(schedule: str, warmup: int, total: int):
    if schedule not in ("constant", "cosine", "linear"):
        raise UserError(f"--lr-schedule {schedule!r} is not one of constant, cosine, linear")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def fill_defaults(cfg: TrainConfig) -> TrainConfig:
    """The method defaults for every field left None; a UserError where the model or the images are missing
    (a --concepts file names the images of each concept instead)."""
    needed = {"model": "cfg.model (a model folder)"}
    if not cfg.concepts:
        needed["images"] = "cfg.images (a folder of concept images)"
    missing = [what for name, what in needed.items() if getattr(cfg, name) is None]
    if missing:
        raise UserError(f"t2i_fast.train needs {' and '.join(missing)}; pass them, or run `t2i-fast train` for "
                        f"the bundled example")
    return with_defaults(cfg)


def check_config(cfg: TrainConfig, method: type[Method]) -> None:
    check_values(cfg)
    check_resolution(cfg.resolution)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    check_family(method, cfg, peek_family(cfg.model))  # from the model's config: nothing is loaded yet
    method.check(cfg)
    lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps)  # an unknown schedule fails here
    settings_from_config(cfg, method.stop)  # and so do bad early-stopping options: all before --out is touched
    if cfg.device != "meta":  # under torchrun / accelerate: the global batch splits over the processes (a plan
        dist.check_batch(cfg.batch_size)  # on the meta device is one process's share: recipe.plan_each_process)


def input_folders(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """(flag, folder) of every image folder the run reads."""
    folders = [("--images", cfg.images), ("--class-images", cfg.class_images)]
    if cfg.concepts:
        folders += [("--concepts", folder) for c in load_concepts(cfg) for folder in (c.images, c.class_images)]
    return folders


def check_output(out: Path, cfg: TrainConfig) -> None:
    """Before any work: --out is a folder we can write, overlaps no input, and what it holds may be replaced
    (--overwrite) or continued with the same settings (--resume)."""
    run_folder.refuse_overlap(out, input_folders(cfg))
    run_folder.check_out(out, cfg.overwrite, cfg.resume)
    if cfg.resume:
        run_folder.refuse_changed_config(out / CHECKPOINT, cfg.to_dict())


def prepare_output(out: Path, cfg: TrainConfig) -> None:
    check_output(out, cfg)
    if cfg.overwrite and not cfg.resume:
        run_folder.remove_ours(out)
    out.mkdir(parents=True, exist_ok=True)




class DeferredInterrupt:
    """While training, the first Ctrl-C (SIGINT) or SIGTERM (docker stop, SLURM preemption) only sets
    `requested`: the step in flight finishes, and the loop saves a checkpoint at that step boundary, so
    --resume continues exactly (a checkpoint written mid-step would hold a half-drawn batch or an update
    without its step count). A second signal interrupts at once. Outside the main thread, where Python
    delivers no signals, and for a signal that is ignored, nothing is installed."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            # like Python itself, leave a signal alone where it is ignored (SIGINT under nohup or `&`)
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = self.SIGNALS.get(signum, "the signal")
        if not dist.is_main():  # torchrun signals every rank; rank 0 speaks and decides for all
            return
        print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again to stop at once)",
              file=sys.stderr)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class Trainer:
    """One training run of one Method: `Trainer(cfg).run()`, or simply t2i_fast.train(cfg) (recipe.py), which
    also runs the methods made of several trainings."""

    def __init__(self, cfg: TrainConfig, on_finished: OnFinished | None = None, components=None):
        """components: the model's models.Components where the caller has them (the memory planner's are on
        the meta device), else they are loaded from cfg.model."""
        cfg = fill_defaults(cfg)
        method = get_method(cfg.method)
        if not issubclass(method, Method):
            raise UserError(f"method {cfg.method} is several trainings in a row; start it with t2i_fast.train(cfg) "
                            f"or `t2i-fast train --method {cfg.method}`, not with Trainer(cfg)")
        self.on_finished = on_finished
        check_config(cfg, method)
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser()
        check_output(self.out, cfg)  # before any work is done
        self.device = resolve_device(dist.init(cfg.device))  # cuda:LOCAL_RANK under a launcher
        self.dtype = resolve_precision(cfg.mixed_precision, self.device)

        # load and check everything before the output folder is touched
        self.comps = components if components is not None else load_components(cfg.model)
        self.owns_components = components is None  # a caller's own modules are never released (_release_cached_modules)
        check_family(method, cfg, self.comps.family)  # a single-file checkpoint's family is known only now
        self.resolution = cfg.resolution or self.comps.native_resolution
        if self.resolution % 8:
            raise UserError(f"the model's native resolution {self.resolution} is not a multiple of 8; pass --resolution")
        concepts = load_concepts(cfg)
        self.method = method(cfg, concepts)
        class_folders = class_image_folders(concepts, cfg, cfg.model, self.resolution, self.method.uses_prior)
        self.streams, self.prior = build_streams(cfg, self.method, concepts, class_folders, self.resolution)
        self._place_models()
        torch.manual_seed(cfg.seed)  # methods initialise their tensors (LoRA A, ...) from the global RNG
        self.method.setup(self.comps)

    def _place_models(self) -> None:
        """Frozen weights in the compute dtype on the device (trained tensors are created in fp32 later; what
        the method trains whole stays fp32)."""
        for name in ("unet", "text_encoder", "text_encoder_2"):
            module = getattr(self.comps, name)
            if module is None:  # text_encoder_2: SDXL only
                continue
            keep = self.dtype == torch.float32 or name in self.method.full_precision_modules
            module.to(self.device) if keep else module.to(self.device, self.dtype)
        self.comps.vae.to(self.device)  # the VAE stays fp32: its latents are cached once, precision is cheap
        if self.cfg.gradient_checkpointing:
            self.comps.unet.enable_gradient_checkpointing()
            if self.method.trains_text_encoder:
                for encoder in self.comps.text_encoders:
                    encoder.gradient_checkpointing_enable()
        if self.cfg.kernels and kernels_enabled():  # the switch off means diffusers' attention too
            try:
                from .nn.attention import set_fast_attention
            except ImportError:  # fused attention not available in this build
                set_fast_attention = None
            if set_fast_attention is not None:
                set_fast_attention(self.comps.unet, True)

    # --- set-up that touches the output folder
    def _build_batches(self) -> BatchSource:
        cfg, comps = self.cfg, self.comps
        source = BatchSource(self.streams, comps, self.device, self.prior, cfg.cache_latents, self.caches_text,
                             progress=cfg.progress)
        # what is cached need not stay in memory: the VAE (and a frozen text encoder) leave the device
        for module in self._cached_modules():
            module.to("cpu")
        return source

    @property
    def caches_text(self) -> bool:
        return self.cfg.cache_text and not self.method.trains_text_encoder

    def _cached_modules(self) -> list:
        return (([self.comps.vae] if self.cfg.cache_latents else [])
                + (list(self.comps.text_encoders) if self.caches_text else []))

    def _release_cached_modules(self) -> None:
        """Once training starts, drop the weights of what the caches replace, where nothing reads them again (the
        sample grid and the evaluation load the run afresh), as the diffusers scripts del theirs: on the CPU,
        leaving the device frees nothing. A caller's own modules, and those a method saves, are kept."""
        if self.owns_components and not self.method.saves_frozen_models:
            for module in self._cached_modules():
                module.to("meta")

    def _checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self, step: int, optimizer, scheduler, generator, losses) -> None:
        # every save (checkpoints, and the final one before the adapter is written) goes through here: a
        # weight that became NaN or inf is caught before it is written. Between saves the loss, checked every
        # step, catches it one step later (a non-finite weight makes the loss non-finite); a per-step scan of
        # the weights would cost ~10% of a step on the bundled model.
        if not all_finite([p.detach() for p in self.method.parameters()]):
            raise self.diverged(step, "a trained weight became NaN or infinite")
        if not dist.is_main():  # the ranks hold the same weights: rank 0 writes them
            self.saved_step = step
            return
        path = self._checkpoint_path()
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_save(dict(self.method.trainable_state()), tmp / "trainable.safetensors", {"step": str(step)})
        stopper = getattr(self, "stopper", None)
        if stopper is not None and stopper.best_state is not None:  # --save-best's adapter survives a resume
            atomic_save(stopper.best_state, tmp / BEST_STATE, {"step": str(stopper.best[0])})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(), "losses": losses,
                    "early_stop": stopper.state_dict() if stopper is not None else None}, tmp / "state.pt")
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=1))
        run_folder.replace_folder(tmp, path)
        self.saved_step = step

    def load_checkpoint(self, optimizer, scheduler, generator) -> tuple[int, list[float]]:
        path = self._checkpoint_path()
        if not (path / "state.pt").is_file():
            raise UserError(f"--resume: no checkpoint in {path}; run without --resume (or with "
                            f"--checkpoint-every N) first")
        try:
            tensors, _ = read_safetensors(path / "trainable.safetensors")
            self.method.load_trainable_state(tensors)
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            if state.get("early_stop") is not None and getattr(self, "stopper", None) is not None:
                self.stopper.load_state_dict(state["early_stop"])  # the criterion continues, not restarts
                if (path / BEST_STATE).is_file():
                    self.stopper.best_state = read_safetensors(path / BEST_STATE)[0]
            step, losses = int(state["step"]), list(state["losses"])
        except (UserError, OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError,
                pickle.UnpicklingError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--resume: the checkpoint {path} is damaged or incomplete ({reason}); start again "
                            f"with --overwrite") from None
        self.saved_step = step
        if dist.is_main():
            run_folder.truncate_log(self.out / LOG, step)
        return step, losses

    def _save_best(self, best_state) -> list[str]:
        """OUT/best: the adapter at the lowest L_det (--save-best), written by the method like the final one."""
        if best_state is None:
            return []
        method = self.method
        current = {k: v.detach().clone() for k, v in method.trainable_state().items()}
        method.load_trainable_state(best_state)
        try:
            best = self.out / "best"
            best.mkdir(parents=True, exist_ok=True)
            return [f"best/{f}" for f in method.save(best)]
        finally:
            method.load_trainable_state(current)

    def loss(self, batch) -> torch.Tensor:
        cfg, comps = self.cfg, self.comps
        added = None
        if batch.time_ids is not None:  # SDXL: the pooled text embedding and the time ids condition the UNet too
            text, pooled = ((batch.text, batch.pooled) if batch.text is not None
                            else self.method.encode_text_sdxl(batch.input_ids, batch.input_ids_2))
            added = {"text_embeds": pooled, "time_ids": batch.time_ids}
        else:
            text = batch.text if batch.text is not None else self.method.encode_text(batch.input_ids)
        autocast = (torch.autocast("cuda", dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            loss = diffusion_loss(comps.unet, comps.scheduler, comps.prediction_type, batch.latents,
                                  batch.noise, batch.timesteps, text, cfg.snr_gamma, batch.mask,
                                  batch.weights, batch.num_instance, added_cond=added)
        extra = self.method.regularizer()
        return loss if extra is None else loss + extra

    def kernels_switch(self):
        """--no-kernels forces the twins; --kernels leaves the choice to an enclosing use_kernels() block, or to
        the environment's default outside one."""
        return use_kernels(False) if not self.cfg.kernels else contextlib.nullcontext()

    def run(self) -> TrainResult:
        with self.kernels_switch(), run_folder.write_errors(self.out):
            return self._run()

    def diverged(self, step: int, what: str) -> UserError:
        """Nothing is saved from a diverged run; the checkpoint written before (if any) stays as it was."""
        kept = (f"{self._checkpoint_path()} still holds step {self.saved_step}" if self.saved_step is not None
                else "no adapter or checkpoint was written")
        return UserError(f"training diverged at step {step} ({what}); {kept}; lower --lr (now {self.cfg.lr:g}, "
                         f"try {self.cfg.lr / 10:g}) and train again with --overwrite")

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        dist.barrier()  # every rank has checked --out (Trainer.__init__) before rank 0 changes it
        if dist.is_main():
            prepare_output(self.out, cfg)
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = self._build_batches()
        # builds the fixed probe batch from the caches
        stopper = self.stopper = EarlyStopper(cfg, self.method.stop, batches, self.loss,
                                              (self.comps.unet, *self.comps.text_encoders), self.device,
                                              self.method.trainable_state, watch=dist.is_main())
        self._release_cached_modules()
        optimizer = build_optimizer(cfg.optimizer, self.method.param_groups(), lr=cfg.lr,
                                    betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                    weight_decay=cfg.weight_decay)
        # the schedule spans the longest the run can last: the cap, or the fixed budget of --early-stop few
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps,
                                                                           stopper.last_step))
        scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        step, losses, self.saved_step = 0, [], None
        if cfg.resume:
            step, losses = self.load_checkpoint(optimizer, scheduler, generator)
        params = self.method.parameters()
        self.comps.unet.train()
        self.method.train()
        log = open(self.out / LOG if dist.is_main() else os.devnull, "a")
        bar = tqdm(total=stopper.last_step, initial=step, desc=f"{cfg.method}",
                   disable=not cfg.progress or not dist.is_main(),
                   dynamic_ncols=True, file=sys.stderr)
        interrupt = DeferredInterrupt()
        averager = dist.GradientAverager(params)  # all-reduces during the backward pass (several processes)
        first_step = time.perf_counter()
        try:
            while step < stopper.last_step:
                if dist.agree(interrupt.requested):  # Ctrl-C during the last step: stop at this clean boundary
                    self.save_checkpoint(step, optimizer, scheduler, generator, losses)
                    if dist.is_main():
                        print(f"\ninterrupted after step {step}; checkpoint saved, continue with --resume",
                              file=sys.stderr)
                    raise KeyboardInterrupt
                stopper.launch(step)  # L_det with the parameters from before this step's update
                total = 0.0
                for micro in range(cfg.grad_accum):
                    # every rank draws the same global batch (one generator stream) and trains on its slice
                    loss = self.loss(dist.share(batches.draw(generator, cfg.batch_size, rows=dist.rows))
                                     ) / cfg.grad_accum
                    if micro == cfg.grad_accum - 1:
                        averager.arm()  # this backward pass makes the step's final gradients
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += loss.item()
                total = averager.finish(total)  # the global gradient and loss on every rank
                if not math.isfinite(total):
                    raise self.diverged(step + 1, f"the loss is {total}")
                if dist.agree(stopper.should_stop(step)):  # rank 0 probes and decides
                    break
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(total)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    log.write(json.dumps({"step": step, "loss": total, "lr": scheduler.get_last_lr()[0],
                                          "time": round(time.perf_counter() - start, 3)}) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{total:.4f}", **stopper.postfix())
                bar.update(1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(step, optimizer, scheduler, generator, losses)
        finally:
            averager.close()
            interrupt.restore()
            bar.close()
            log.close()
        self.save_checkpoint(step, optimizer, scheduler, generator, losses)
        train_time = time.perf_counter() - start
        if not dist.is_main():
            return dist.from_main(None)  # rank 0 writes the adapter, plot, grid and report, then shares its result
        peak = peak_memory_mb(self.device)
        files = self.method.save(self.out)
        steps_to_files = time.perf_counter() - first_step  # the training loop and the adapter written
        files += self._save_best(stopper.best_state)
        files += stopper.finish(self.out, losses)
        if cfg.num_samples > 0:
            for module in (self.comps.unet, self.comps.vae, *self.comps.text_encoders):
                if not next(module.parameters()).is_meta:  # (released ones hold nothing)
                    module.to("cpu")  # free the device for the fresh pipeline
        grid_pipeline = sample_grid(cfg, self.out, self.resolution, str(self.device), files)
        report = {
            "version": __version__, "config": cfg.to_dict(), "method": cfg.method, "steps": step,
            "max_steps": cfg.max_steps, "wall_time_s": round(time.perf_counter() - start, 3),
            "train_time_s": round(train_time, 3), "first_step_to_files_s": round(steps_to_files, 3),
            "final_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "peak_memory_mb": round(peak, 1), "device": str(self.device), "dtype": str(self.dtype),
            "resolution": self.resolution, "files": files + [LOG, REPORT],
        }
        report["early_stop"] = stopper.report(train_time)
        if dist.world() > 1:  # data parallel: --batch-size is the global batch, split over these processes
            report["processes"] = dist.world()
        hand_over(cfg, self.out, report, grid_pipeline, self.on_finished)
        return dist.from_main(TrainResult(self.out, step, losses, losses[-1] if losses else float("nan"),
                                          report["wall_time_s"], peak, report["files"], report))


def sample_grid(cfg: TrainConfig, out: Path, resolution: int | None, device: str, files: list[str]):
    """OUT/samples.png through diffusers' own loaders, from the adapter files just written, where --num-samples
    asks for one (training is over: a Ctrl-C here says what is saved and what is missing); its name is added
    to `files`. Returns the pipeline that drew it (for on_finished), or None."""
    from .sampling import sample, sampling_pipeline

    if cfg.num_samples <= 0:
        return None
    if cfg.progress:
        print(f"sampling {cfg.num_samples} image{'s' if cfg.num_samples != 1 else ''} for the grid ...",
              file=sys.stderr)
    prompt = format_prompt(cfg.sample_prompt or "a photo of {token} {cls}", cfg.token, cfg.class_word)
    try:
        pipe = sampling_pipeline(cfg.model, out, device=device, progress=False)
        sample(cfg.model, out, prompt, n=cfg.num_samples, seed=cfg.seed, steps=cfg.sample_steps,
               resolution=resolution, grid_path=out / GRID, device=device, pipe=pipe)
    except KeyboardInterrupt:
        run_folder.remove_temporaries(out)
        print(f"\ninterrupted while drawing the sample grid: training is finished and the adapter is saved in "
              f"{out}, but {GRID} and {REPORT} are missing; rerun the same command with --resume to write them",
              file=sys.stderr)
        raise
    files.append(GRID)
    return pipe


def write_report(out: Path, report: dict) -> None:
    """OUT/report.json, written whole or not at all."""
    run_folder.write_text(out / REPORT, json.dumps(report, indent=2))


def hand_over(cfg: TrainConfig, out: Path, report: dict, pipeline, on_finished: OnFinished | None) -> None:
    """The run's report.json written, then on_finished (where given) called with it and the grid's pipeline."""
    write_report(out, report)
    if on_finished is not None:
        on_finished(cfg, out, report, pipeline)
