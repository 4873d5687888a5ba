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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, run_folder
from .batches import BatchSource
from .config import TrainConfig, check_values
from .concepts import build_streams
from .data import TextCache, format_prompt
from .diffusion import diffusion_loss
from .errors import UserError
from .formats import atomic_save, read_safetensors
from .methods import get_method
from .models import load_components
from .optim import OPTIMIZERS, all_finite, build_optimizer
from .run_folder import CHECKPOINT, CHECKPOINT_CONFIG, GRID, LOG, REPORT
from .stopping import EarlyStopper, settings_from_config

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name not in ("auto", "no", "fp16", "bf16"):
        raise UserError(f"--mixed-precision {name!r} is not one of auto, no, fp16, bf16")
    if device.type != "cuda" and name in ("fp16", "bf16"):
        warnings.warn(f"--mixed-precision {name} applies on CUDA only; training in fp32 on the {device.type}",
                      stacklevel=2)
    if device.type != "cuda" or name == "no":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if name == "fp16" else torch.bfloat16


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


TOY_UNET_LR = {"lora": {"lr": 1e-3}, "custom_diffusion": {"lr": 1e-4}, "dreambooth": {"lr": 5e-5},
               "two_stage": {"stage2_lr": 1e-3}}


def fill_defaults(cfg: TrainConfig) -> TrainConfig:
    """Bundled model and concept where none is given; method defaults for the rest."""
    from . import defaults

    changes = {}
    if cfg.model is None:
        changes["model"] = defaults.default_model()
        if defaults.is_default_model(changes["model"]):
            # the bundled 1M-parameter UNet learns a concept at about 10x SD's rates (measured for LoRA);
            # the token embedding rates (textual inversion, two-stage's first stage) are SD's
            for name, value in TOY_UNET_LR.get(cfg.method, {}).items():
                if getattr(cfg, name) is None:
                    changes[name] = value
    if cfg.images is None:
        concept = defaults.default_concept()
        changes["images"] = concept["images"]
        if not cfg.class_word:
            changes["class_word"] = concept["class_word"]
        if cfg.token is None:  # not given: the example concept's own token (an explicit one is kept)
            changes["token"] = concept["token"]
    return cfg.replace(**changes).resolved()


def check_resolution(resolution: int | None) -> None:
    """--resolution, where given, must be a positive multiple of 8 (the VAE downsamples by 8)."""
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise UserError(f"--resolution {resolution} is not a positive multiple of 8; use e.g. "
                        f"{max(8, resolution // 8 * 8)}")


def check_config(cfg: TrainConfig) -> None:
    check_values(cfg)
    check_resolution(cfg.resolution)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if cfg.concepts and (cfg.method == "textual_inversion" or (cfg.method == "lora" and cfg.train_token)):
        raise UserError(f"--concepts with {cfg.method}{' --train-token' if cfg.method == 'lora' else ''} would learn "
                        f"one token ({cfg.token}) that the concepts' prompts never use; train one concept per run, "
                        f"or use --method custom_diffusion, which learns a token per concept")
    lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps)  # an unknown schedule fails here
    settings_from_config(cfg)  # and so do bad early-stopping options: all before the output folder is touched


def input_folders(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """(flag, folder) of every image folder the run reads."""
    from .concepts import load_concepts

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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def kernels_enabled(enabled: bool):
    """Route every fused op to its plain PyTorch twin while `enabled` is False (T2I_FAST_KERNELS=0)."""
    old = os.environ.get("T2I_FAST_KERNELS")
    if not enabled:
        os.environ["T2I_FAST_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("T2I_FAST_KERNELS", None)
        else:
            os.environ["T2I_FAST_KERNELS"] = old


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
        print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again to stop at once)",
              file=sys.stderr)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class Trainer:
    """One personalization run. `Trainer(cfg).run()` or simply `train(cfg)`."""

    def __init__(self, cfg: TrainConfig):
        cfg = fill_defaults(cfg)
        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser()
        check_output(self.out, cfg)  # before any work is done
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.mixed_precision, self.device)

        # load and check everything before the output folder is touched
        self.comps = load_components(cfg.model)
        self.resolution = cfg.resolution or self.comps.native_resolution
        if self.resolution % 8:
            raise UserError(f"the model's native resolution {self.resolution} is not a multiple of 8; pass --resolution")
        self.method = get_method(cfg.method)(cfg)
        self.streams, self.prior = build_streams(cfg, self.method, cfg.model, self.resolution)
        self._place_models()
        torch.manual_seed(cfg.seed)  # methods initialise their tensors (LoRA A, ...) from the global RNG
        self.method.setup(self.comps)

    def _place_models(self) -> None:
        """Frozen weights in the compute dtype on the device (trained tensors are created in fp32 later; what
        the method trains whole stays fp32)."""
        for name in ("unet", "text_encoder"):
            module = getattr(self.comps, name)
            keep = self.dtype == torch.float32 or name in self.method.full_precision_modules
            module.to(self.device) if keep else module.to(self.device, self.dtype)
        self.comps.vae.to(self.device)  # the VAE stays fp32: its latents are cached once, precision is cheap
        if self.cfg.gradient_checkpointing:
            self.comps.unet.enable_gradient_checkpointing()
            if self.method.trains_text_encoder:
                self.comps.text_encoder.gradient_checkpointing_enable()
        from .kernels._dispatch import kernels_enabled as kernels_switched_on

        if self.cfg.kernels and kernels_switched_on():  # T2I_FAST_KERNELS=0 means diffusers' attention too
            try:
                from .nn.attention import set_fast_attention
            except ImportError:  # fused attention not available in this build
                set_fast_attention = None
            if set_fast_attention is not None:
                set_fast_attention(self.comps.unet, True)

    # --- set-up that touches the output folder
    def _build_batches(self) -> BatchSource:
        cfg, comps = self.cfg, self.comps
        text_cache = None
        if cfg.cache_text and not self.method.trains_text_encoder:
            prompts = [p for s in self.streams + ([self.prior] if self.prior else []) for p in s.all_prompts()]
            text_cache = TextCache(list(dict.fromkeys(prompts)), comps.tokenizer, comps.text_encoder)
        source = BatchSource(self.streams, comps, self.device, self.prior, cfg.cache_latents, text_cache,
                             progress=cfg.progress)
        # what is cached need not stay in memory: the VAE (and a frozen text encoder) leave the device
        if cfg.cache_latents:
            comps.vae.to("cpu")
        if text_cache is not None:
            comps.text_encoder.to("cpu")
        return source

    def _checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self, step: int, optimizer, scheduler, generator, losses) -> None:
        # every save (checkpoints, and the final one before the adapter is written) goes through here: a
        # weight that became NaN or inf is caught before it is written. Between saves the loss, checked every
        # step, catches it one step later (a non-finite weight makes the loss non-finite); a per-step scan of
        # the weights would cost ~10% of a step on the bundled model.
        if not all_finite([p.detach() for p in self.method.parameters()]):
            raise self.diverged(step, "a trained weight became NaN or infinite")
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
        run_folder.truncate_log(self.out / LOG, step)
        return step, losses

    def loss(self, batch) -> torch.Tensor:
        cfg, comps = self.cfg, self.comps
        text = batch.text if batch.text is not None else self.method.encode_text(batch.input_ids)
        autocast = (torch.autocast("cuda", dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            return diffusion_loss(comps.unet, comps.scheduler, comps.prediction_type, batch.latents,
                                  batch.noise, batch.timesteps, text, cfg.snr_gamma, batch.mask,
                                  batch.weights, batch.num_instance)

    def run(self) -> TrainResult:
        with kernels_enabled(self.cfg.kernels), run_folder.write_errors(self.out):
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
        prepare_output(self.out, cfg)
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = self._build_batches()
        stopper = self.stopper = EarlyStopper(cfg, self, batches)  # builds the fixed probe batch from the caches
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
        log = open(self.out / LOG, "a")
        bar = tqdm(total=stopper.last_step, initial=step, desc=f"{cfg.method}", disable=not cfg.progress,
                   dynamic_ncols=True, file=sys.stderr)
        interrupt = DeferredInterrupt()
        try:
            while step < stopper.last_step:
                if interrupt.requested:  # Ctrl-C during the last step: it finished; stop at this clean boundary
                    self.save_checkpoint(step, optimizer, scheduler, generator, losses)
                    print(f"\ninterrupted after step {step}; checkpoint saved, continue with --resume",
                          file=sys.stderr)
                    raise KeyboardInterrupt
                stopper.launch(step)  # L_det with the parameters from before this step's update
                total = 0.0
                for _ in range(cfg.grad_accum):
                    loss = self.loss(batches.draw(generator, cfg.batch_size)) / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += loss.item()
                if not math.isfinite(total):
                    raise self.diverged(step + 1, f"the loss is {total}")
                if stopper.should_stop(step):
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
            interrupt.restore()
            bar.close()
            log.close()
        self.save_checkpoint(step, optimizer, scheduler, generator, losses)
        train_time = time.perf_counter() - start
        peak = peak_memory_mb(self.device)
        files = self.method.save(self.out)
        files += stopper.finish(self.out, losses)
        if cfg.num_samples > 0:
            for module in (self.comps.unet, self.comps.vae, self.comps.text_encoder):
                module.to("cpu")  # free the device for the fresh pipeline
            files.append(sample_grid(cfg, self.out, self.resolution, str(self.device)))
        report = {
            "version": __version__, "config": cfg.to_dict(), "method": cfg.method, "steps": step,
            "max_steps": cfg.max_steps, "wall_time_s": round(time.perf_counter() - start, 3),
            "train_time_s": round(train_time, 3), "final_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "peak_memory_mb": round(peak, 1), "device": str(self.device), "dtype": str(self.dtype),
            "resolution": self.resolution, "files": files + [LOG, REPORT],
        }
        report["early_stop"] = stopper.report(train_time)
        write_report(self.out, report)
        add_evaluation(cfg, self.out, report)
        return TrainResult(self.out, step, losses, losses[-1] if losses else float("nan"),
                           report["wall_time_s"], peak, report["files"], report)


def sample_grid(cfg: TrainConfig, out: Path, resolution: int | None, device: str) -> str:
    """OUT/samples.png through diffusers' own loaders, from the adapter files just written (training is over:
    a Ctrl-C here says what is saved and what is missing)."""
    from .sampling import sample

    if cfg.progress:
        print(f"sampling {cfg.num_samples} image{'s' if cfg.num_samples != 1 else ''} for the grid ...",
              file=sys.stderr)
    prompt = format_prompt(cfg.sample_prompt or "a photo of {token} {cls}", cfg.token, cfg.class_word)
    try:
        sample(cfg.model, out, prompt, n=cfg.num_samples, seed=cfg.seed, steps=cfg.sample_steps,
               resolution=resolution, grid_path=out / GRID, device=device, progress=False)
    except KeyboardInterrupt:
        run_folder.remove_temporaries(out)
        print(f"\ninterrupted while drawing the sample grid: training is finished and the adapter is saved in "
              f"{out}, but {GRID} and {REPORT} are missing; rerun the same command with --resume to write them",
              file=sys.stderr)
        raise
    return GRID


def add_evaluation(cfg: TrainConfig, out: Path, report: dict) -> None:
    """Where the run trained the bundled model on one concept (and --evaluate): score it with the toy
    evaluator (a reduced setting: 4 images per prompt, 12 steps; eval.json) and add the scores to report.json."""
    from .defaults import is_default_model

    if not (cfg.evaluate and is_default_model(cfg.model) and not cfg.concepts):
        return
    from .toy.evaluate import EVAL_IMAGES, EVAL_STEPS, evaluate_run

    if cfg.progress:
        print("scoring the run with the toy evaluator ...", file=sys.stderr)
    try:
        report["eval"] = evaluate_run(out, n_images=EVAL_IMAGES, num_inference_steps=EVAL_STEPS)
    except KeyboardInterrupt:
        run_folder.remove_temporaries(out)
        print(f"\ninterrupted while scoring the run: the run is finished and saved in {out} ({REPORT}, the "
              f"adapter), but {run_folder.EVAL} and the scores in {REPORT} are missing; run "
              f"`t2i-fast eval {out}` to score it", file=sys.stderr)
        raise
    report["files"].append("eval.json")
    write_report(out, report)


def write_report(out: Path, report: dict) -> None:
    """OUT/report.json, written whole or not at all."""
    run_folder.write_text(out / REPORT, json.dumps(report, indent=2))


def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Personalize a model as `cfg` says and write the adapter, report, log and sample grid to cfg.out."""
    cfg = (cfg or TrainConfig()).replace(**overrides) if overrides or cfg is None else cfg
    run_stages = getattr(get_method(cfg.method), "run_stages", None)
    if run_stages is not None:  # a method made of several trainings in a row, each a Trainer (two_stage)
        return run_stages(cfg)
    return Trainer(cfg).run()
