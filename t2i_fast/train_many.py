"""t2i-fast train-many: one separate training per concept listed in a file, in this process or on a Ray cluster.

    t2i-fast train-many --concepts many.toml --model ./sd15 --method lora --out runs/many
    t2i-fast train-many --concepts many.toml --model ./sd15 --ray auto --gpus-per-concept 0.5

The file (TOML or JSON) holds `concepts`, a list of entries, and optionally `defaults`, TrainConfig keys for
every entry. An entry is TrainConfig keys (images, token, class_word, any override) plus `name` (its folder
under --out; default: its images folder's name) or its own `out`. Paths in the file are relative to the file.
Priority, lowest first: field defaults < preset < the file's defaults < the command's flags < the entry.

The whole file is checked before anything trains. A concept whose folder holds report.json is finished and
never trained again; one with a checkpoint resumes. A concept that fails with a UserError is recorded and the
others go on; a summary table ends the run, whose exit status is 1 if any failed.

Locally the model is loaded once and each concept trains on a deep copy of it: the methods patch the modules
they are given (LoRA injects layers, TI adds tokens, Custom Diffusion swaps processors), so the pristine copy
must never be handed out. A copy costs a memory copy whatever the model came from; with a warm page cache a
reload of memory-mapped safetensors can be as fast or faster (bench/bench_train_many.py), but a cold disk, a
network file system or a single-file checkpoint's conversion do not have that luck. On Ray each worker process keeps its own pristine copy (_PRISTINE).
Staged methods (two_stage) run through t2i_fast.train, each stage on its own copy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import run_folder
from .config import (PRESETS, TrainConfig, add_config_flags, check_method_options, check_types, field_kinds,
                     load_config_file, read_toml_or_json, resolve_config)
from .errors import UserError
from .run_folder import CHECKPOINT, PATH_FIELDS, REPORT

RAY_HINT = "pip install t2i-fast[ray]"
# keys train-many decides itself, per concept, from what its folder holds
DECIDED = ("resume", "overwrite")
ENTRY_KEYS = ("name", "preset")
RETRIES = 2  # Ray re-runs a task whose worker died this many times; the rerun resumes from its checkpoint
# test-only: "NAME=MARKER" makes concept NAME's worker exit right after its first checkpoint, once (while
# MARKER does not exist); the Ray test uses it to kill a task midway. Nothing else reads it.
TEST_EXIT_AFTER_CHECKPOINT = "T2I_FAST_TEST_EXIT_AFTER_CHECKPOINT"


@dataclass
class Job:
    """One concept to train: its entry number and name in the file, and its full config (defaults filled)."""
    entry: int
    name: str
    cfg: TrainConfig


@dataclass
class Outcome:
    """One row of the summary. status: trained | resumed | done (finished before, skipped) | failed."""
    name: str
    status: str
    out: str
    steps: int | None = None
    wall_time: float | None = None
    error: str | None = None
    resumed_from: int | None = None


# --- the file

def read_file(path: Path) -> tuple[dict, list[dict]]:
    """(defaults, entries) of a train-many file: {"concepts": [...], "defaults": {...}} in TOML or JSON (a bare
    JSON list is the entries alone)."""
    data = read_toml_or_json(path, "concepts file", "a list `concepts`")
    if isinstance(data, list):
        data = {"concepts": data}
    unknown = sorted(set(data) - {"concepts", "defaults"}) if isinstance(data, dict) else []
    if not isinstance(data, dict) or unknown:
        raise UserError(f"concepts file {path} must hold `concepts` (a list of entries) and optionally `defaults`"
                        + (f", not {', '.join(unknown)}" if unknown else ""))
    entries, defaults = data.get("concepts"), data.get("defaults", {})
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"concepts file {path}: `concepts` must be a non-empty list of tables/objects "
                        f"([[concepts]] in TOML)")
    if not isinstance(defaults, dict):
        raise UserError(f"concepts file {path}: `defaults` must be a table/object of TrainConfig keys")
    return defaults, entries


def _keys(values: dict, where: str) -> dict:
    """values with dashes as underscores; a UserError for keys that are not TrainConfig fields."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(TrainConfig.field_names()) - set(ENTRY_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed are name, preset and the "
                        f"TrainConfig fields (`t2i-fast train --help`)")
    decided = sorted(set(values) & set(DECIDED))
    if decided:
        raise UserError(f"{where}: remove {', '.join(decided)}; train-many decides it per concept (a finished "
                        f"concept is skipped, one with a checkpoint resumes; to train one again, give it a new out)")
    check_types(values, {**field_kinds(TrainConfig), "name": (str, True), "preset": (str, True)}, where)
    return values


def _relative_to(values: dict, base: Path) -> dict:
    """The file's paths taken relative to the file (~ first; absolute paths stay)."""
    return {k: str(base / os.path.expanduser(v)) if k in PATH_FIELDS + ("out",) and v else v
            for k, v in values.items()}


def plan(concepts: str | os.PathLike, common: dict[str, Any] | None = None) -> list[Job]:
    """Read and check the whole file: every entry's config, folders and output. A UserError naming the entry
    for the first problem, before anything is trained or written. common: TrainConfig keys given to the
    command (flags), over the file's defaults and under each entry's own."""
    path = Path(concepts).expanduser()
    common = _keys(dict(common or {}), "train-many")
    raw_defaults, entries = read_file(path)
    defaults = _relative_to(_keys(raw_defaults, f"concepts file {path}, defaults"), path.parent)
    jobs, outs = [], {}
    for n, raw in enumerate(entries, 1):
        where = f"concepts file {path}, entry {n}" + (f" ({raw['name']})" if isinstance(raw.get("name"), str) else "")
        try:
            entry = _relative_to(_keys(raw, where), path.parent)
            values = {**defaults, **common, **entry}
            name = entry.pop("name", None) or (Path(values["images"]).name if values.get("images") else f"concept{n}")
            if Path(name).name != name or name in (".", ".."):
                raise UserError(f"{where}: name {name!r} must be a plain folder name (no / or ..)")
            values.pop("name", None)
            if "out" not in entry:  # the entry's own out is its folder; else it is named under the common out
                values["out"] = str(Path(values.get("out") or TrainConfig.out) / name)
            job = _job(n, name, values, where)
        except UserError as e:
            message = str(e)
            raise UserError(message if message.startswith(where) else f"{where}: {message}") from None
        out = Path(job.cfg.out).expanduser().resolve()
        if out in outs:
            raise UserError(f"{where}: its output {out} is also entry {outs[out]}'s; give each concept its own "
                            f"name or out")
        outs[out] = n
        jobs.append(job)
    _refuse_nested(jobs)
    return jobs


def _job(n: int, name: str, values: dict, where: str) -> Job:
    from .data import list_images
    from .methods import get_method
    from .methods.base import StagedMethod
    from .trainer import check_config, check_output, fill_defaults, input_folders

    preset = values.pop("preset", None)
    if values.get("model") is None:
        raise UserError(f"{where}: no model; pass --model DIR, or set model in the file's [defaults]")
    cfg = resolve_config(values, preset)
    check_method_options(cfg)
    cfg = fill_defaults(cfg)
    method = get_method(cfg.method)
    if issubclass(method, StagedMethod):
        method.check(cfg)
    else:
        check_config(cfg, method)
    if not cfg.concepts:
        list_images(cfg.images)
    for flag, folder in input_folders(cfg):  # --concepts' folders are read by input_folders itself
        if folder and flag != "--images":
            list_images(folder)
    _check_model(cfg.model)
    if folder_state(Path(cfg.out).expanduser()) != "done":  # --out writable, a checkpoint's settings unchanged
        check_output(Path(cfg.out).expanduser(), decided(cfg))
    if cfg.vram:  # fit the run to the budget now, from the configs alone (as t2i_fast.train does)
        from .memplan import fit, parse_size

        cfg, _ = fit(cfg, parse_size(cfg.vram), say=lambda *a: None)
    return Job(n, name, cfg)


def _check_model(model: str) -> None:
    from .models import check_model_folder

    path = Path(model).expanduser()
    if not (path.is_file() and path.suffix == ".safetensors"):
        check_model_folder(path)


def _refuse_nested(jobs: list[Job]) -> None:
    """No concept's output may be inside another's, or hold or sit in any concept's inputs."""
    from .trainer import input_folders

    inputs = [(f"{flag} of {j.name}", folder) for j in jobs for flag, folder in input_folders(j.cfg)]
    for job in jobs:
        out = Path(job.cfg.out).expanduser().resolve()
        for other in jobs:
            theirs = Path(other.cfg.out).expanduser().resolve()
            if other is not job and out.is_relative_to(theirs):
                raise UserError(f"entry {job.entry} ({job.name}): its output {out} is inside entry {other.entry} "
                                f"({other.name})'s output {theirs}; give them folders side by side")
        try:
            run_folder.refuse_overlap(out, inputs)
        except UserError as e:
            raise UserError(f"entry {job.entry} ({job.name}): {e}") from None


# --- one concept

def folder_state(out: Path) -> str:
    """done (report.json), resume (a checkpoint), restart (a run of ours with neither: nothing to keep) or
    fresh."""
    if (out / REPORT).is_file():
        return "done"
    run_folder.recover(out / CHECKPOINT)
    if run_folder.has_checkpoint(out):
        return "resume"
    return "restart" if run_folder.holds_run(out) else "fresh"


def decided(cfg: TrainConfig) -> TrainConfig:
    """cfg with resume / overwrite as the output folder asks. overwrite only ever removes our own files of a
    run that left neither a report nor a checkpoint (run_folder.remove_ours)."""
    state = folder_state(Path(cfg.out).expanduser())
    return cfg.replace(resume=state == "resume", overwrite=state == "restart")


def finished_outcome(job: Job) -> Outcome:
    out = Path(job.cfg.out).expanduser()
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        report = {}
    return Outcome(job.name, "done", str(out), report.get("steps"), report.get("wall_time_s"))


def _checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint a resumed run starts from (read from the header alone)."""
    from safetensors import safe_open

    path = out / CHECKPOINT / "trainable.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step"))
    except Exception:  # unreadable, or no step: safetensors raises its own error types
        return None


def share_class_images(cfg: TrainConfig, pristine) -> None:
    """Generate the class images this concept needs, with the model already in memory, into the cache every
    concept of the same class prompt (and model, size, count, seed) shares: the trainer then finds them."""
    from .class_images import cached_folder, generate_class_images
    from .concepts import load_concepts
    from .methods import get_method
    from .runtime import resolve_device

    method = get_method(cfg.method)
    if not getattr(method, "uses_prior", False):
        return
    resolution = cfg.resolution or pristine.native_resolution
    for c in load_concepts(cfg):
        if c.class_images or not c.class_prompt:
            continue
        folder = cached_folder(cfg.model, c.class_prompt, resolution, cfg.num_class_images, cfg.seed)
        if (folder / "done").is_file():
            continue
        from diffusers import DPMSolverMultistepScheduler

        comps = copy.deepcopy(pristine)  # the pipeline moves its modules to the device; the pristine stay put
        pipe = comps.pipeline(DPMSolverMultistepScheduler.from_config(comps.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        pipe.to(str(resolve_device(cfg.device)))
        generate_class_images(cfg.model, c.class_prompt, cfg.num_class_images, resolution, folder, cfg.seed,
                              progress=cfg.progress, pipe=pipe)
        del pipe, comps


def run_one(job: Job) -> Outcome:
    """Train one concept on a copy of this process's pristine model (pristine_components; a staged method gets
    a copy per stage), locally or as a Ray task. A UserError (or running out of GPU memory) becomes a failed Outcome;
    anything else (a bug) propagates."""
    import torch

    from .methods import get_method
    from .methods.base import StagedMethod

    staged = issubclass(get_method(job.cfg.method), StagedMethod)
    pristine = pristine_components(job.cfg.model)
    out = Path(job.cfg.out).expanduser()
    start = time.perf_counter()
    try:
        cfg = decided(job.cfg)
        if (out / REPORT).is_file():  # a Ray retry of a task whose first attempt finished
            return finished_outcome(job)
        resumed_from = _checkpoint_step(out) if cfg.resume else None
        if staged:  # each stage trains on its own copy
            from .recipe import train

            result = train(cfg, fresh_components=lambda: copy.deepcopy(pristine))
        else:
            from .trainer import Trainer

            share_class_images(cfg, pristine)
            trainer = Trainer(cfg, components=copy.deepcopy(pristine))
            _test_exit_hook(trainer, job.name)
            try:
                result = trainer.run()
            finally:
                del trainer
                _free_memory()
        return Outcome(job.name, "resumed" if cfg.resume else "trained", str(out), result.steps,
                       round(time.perf_counter() - start, 3), resumed_from=resumed_from)
    except UserError as e:
        return Outcome(job.name, "failed", str(out), None, round(time.perf_counter() - start, 3), error=str(e))
    except torch.cuda.OutOfMemoryError:  # this concept's settings do not fit; the next one's may
        _free_memory()
        return Outcome(job.name, "failed", str(out), None, round(time.perf_counter() - start, 3),
                       error="out of GPU memory; in its entry lower batch_size or resolution, or set vram = "
                             "\"8GB\", and give it a new out")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_initialized():  # never initialise CUDA just to empty its cache
        torch.cuda.empty_cache()


def _test_exit_hook(trainer, name: str) -> None:
    """Test-only (see TEST_EXIT_AFTER_CHECKPOINT): the worker dies right after the concept's first checkpoint."""
    spec = os.environ.get(TEST_EXIT_AFTER_CHECKPOINT, "")
    target, _, marker = spec.partition("=")
    if target != name or not marker or Path(marker).exists():
        return
    save = trainer.save_checkpoint

    def save_then_exit(step, *args):
        save(step, *args)
        if step > 0:
            Path(marker).write_text(f"{name} killed after step {step}\n")
            os._exit(1)

    trainer.save_checkpoint = save_then_exit


# --- many concepts, locally

_PRISTINE: dict[str, Any] = {}  # model path -> models.Components, loaded once per process, never trained


def pristine_components(model: str):
    """The model's components, loaded once per process (one model at a time: another replaces it)."""
    from .models import load_components

    key = str(Path(model).expanduser().resolve())
    if key not in _PRISTINE:
        _PRISTINE.clear()
        _free_memory()
        _PRISTINE[key] = load_components(model)
    return _PRISTINE[key]


def run_local(jobs: list[Job], say=print) -> list[Outcome]:
    """One concept after another in this process, grouped by model so that each model loads once."""
    outcomes = {}
    order = sorted(jobs, key=lambda j: str(Path(j.cfg.model).expanduser().resolve()))  # stable: file order within
    try:
        _run_in_order(order, outcomes, say)
    finally:  # the caller's process goes on without the model in memory (a Ray worker keeps it for its next task)
        _PRISTINE.clear()
        _free_memory()
    return [outcomes[j.entry] for j in jobs]


def _run_in_order(jobs: list[Job], outcomes: dict, say) -> None:
    for i, job in enumerate(jobs, 1):
        if folder_state(Path(job.cfg.out).expanduser()) == "done":
            outcomes[job.entry] = finished_outcome(job)
            say(f"[{i}/{len(jobs)}] {job.name}: finished before, skipped ({job.cfg.out})")
            continue
        say(f"[{i}/{len(jobs)}] {job.name}: training {job.cfg.method} into {job.cfg.out}")
        outcomes[job.entry] = outcome = run_one(job)
        if outcome.error:
            say(f"[{i}/{len(jobs)}] {job.name}: failed: {outcome.error}")


# --- many concepts, on Ray

def _ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


def connect(address: str) -> None:
    """Join the cluster at `address` (auto, local or ray://host:port), or keep the connection already made."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address != "local" and address != "auto" and not address.startswith("ray://"):
        raise UserError(f"--ray {address!r} is not auto, local or ray://HOST:PORT")
    try:
        # "local" starts a new cluster here even where one runs; the workers' own output stays in Ray's logs
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise UserError(f"--ray {address}: no Ray cluster there ({str(e).splitlines()[0]}); start one with "
                        f"`ray start --head`, or pass --ray local") from None


def run_ray(jobs: list[Job], address: str, gpus_per_concept: float = 1.0, cpus_per_concept: float = 1.0,
            say=print) -> list[Outcome]:
    """One Ray task per unfinished concept, each asking for gpus_per_concept GPUs (CPUs on a cluster without
    GPUs); a task whose worker dies is run again and resumes from its checkpoint."""
    ray = _ray()
    connect(address)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    # GPU tasks get a fresh worker per call by default (max_calls=1), which would reload the model each time
    task = ray.remote(num_gpus=gpus_per_concept if gpus else 0, num_cpus=cpus_per_concept, max_retries=RETRIES,
                      max_calls=0)(run_one)  # the worker keeps its pristine model between tasks
    outcomes, pending = {}, {}
    for job in jobs:
        if folder_state(Path(job.cfg.out).expanduser()) == "done":
            outcomes[job.entry] = finished_outcome(job)
            continue
        cfg = job.cfg
        if not cfg.checkpoint_every:  # a retried task resumes from here instead of step 0
            cfg = cfg.replace(checkpoint_every=max(1, (cfg.max_steps or 10) // 10))
        pending[task.remote(dataclasses.replace(job, cfg=cfg.replace(progress=False)))] = job
    say(f"{len(pending)} concept(s) to train on Ray ({'GPU' if gpus else 'CPU'} tasks), "
        f"{len(outcomes)} finished before")
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as e:  # a bug in the task, or its worker died more than RETRIES times
            outcome = Outcome(job.name, "failed", job.cfg.out, error=(str(e).strip().splitlines() or ["?"])[-1])
        outcomes[job.entry] = outcome
        say(f"[{len(outcomes)}/{len(jobs)}] {job.name}: {outcome.status}"
            + (f": {outcome.error}" if outcome.error else ""))
    return [outcomes[j.entry] for j in jobs]


# --- the API and the command

def train_many(concepts: str | os.PathLike, ray: str | None = None, gpus_per_concept: float = 1.0,
               cpus_per_concept: float = 1.0, say=print, **common) -> list[Outcome]:
    """Train each concept of the file `concepts` separately (see the module's docstring); common: TrainConfig
    keys for every concept (over the file's defaults, under each entry). ray: None (here, one after another),
    or auto | local | ray://HOST:PORT. Returns one Outcome per entry, in the file's order, and prints a table."""
    if gpus_per_concept <= 0 or cpus_per_concept <= 0:
        raise UserError("--gpus-per-concept and --cpus-per-concept must be positive (e.g. 0.5 shares a GPU)")
    if ray is not None:
        _ray()  # before the file is read: the missing extra is the first thing to fix
    jobs = plan(concepts, common)
    outcomes = run_local(jobs, say) if ray is None else run_ray(jobs, ray, gpus_per_concept, cpus_per_concept, say)
    say(summary_table(outcomes))
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [("concept", "status", "steps", "wall time", "output")]
    for o in outcomes:
        status = o.status + (f" from step {o.resumed_from}" if o.resumed_from is not None else "")
        rows.append((o.name, status, "-" if o.steps is None else str(o.steps),
                     "-" if o.wall_time is None else f"{o.wall_time:.1f} s", o.out))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    failed = [o for o in outcomes if o.status == "failed"]
    lines += [f"{o.name} failed: {o.error}" for o in failed]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2i-fast train-many", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
        description="Train one adapter per concept of a TOML/JSON file, here one after another (the model "
                    "loaded once) or one Ray task per concept. Flags apply to every concept; the file's "
                    "entries override them.")
    parser.add_argument("--concepts", required=True, dest="concepts_file", metavar="FILE",
                        help="TOML/JSON file: `concepts` (entries of images, token, class_word, name or out, "
                             "and any TrainConfig key) and optional `defaults`")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help=f"run on Ray: auto | local | ray://HOST:PORT (needs {RAY_HINT})")
    parser.add_argument("--gpus-per-concept", type=float, default=1.0,
                        help="GPUs each Ray task asks for; 0.5 trains two concepts per GPU [default: 1]")
    parser.add_argument("--cpus-per-concept", type=float, default=1.0,
                        help="CPUs each Ray task asks for (on a cluster without GPUs, all it asks for) [default: 1]")
    parser.add_argument("--config", help="a .toml or .json file of TrainConfig keys (flags override it)")
    parser.add_argument("--preset", help=f"named preset: {', '.join(sorted(PRESETS))}")
    add_config_flags(parser, skip=DECIDED + ("concepts",))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    concepts, ray = args.pop("concepts_file"), args.pop("ray")
    gpus, cpus = args.pop("gpus_per_concept"), args.pop("cpus_per_concept")
    config, preset = args.pop("config"), args.pop("preset")
    common = {**(load_config_file(config) if config else {}), **args}
    if preset:
        common["preset"] = preset
    outcomes = train_many(concepts, ray=ray, gpus_per_concept=gpus, cpus_per_concept=cpus, **common)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
