"""The run folder (--out of train and merge): which files are ours, whether a folder holds a run of ours,
removing only our files, refusing an --out that overlaps an input, replacing the checkpoint so that a kill
at any moment leaves a complete one, and what may change between a run and its --resume.

Nothing here deletes a file whose name we do not write: --overwrite removes our files and leaves the
user's, and it is refused on a folder that holds no run of ours.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

from .cd_files import CD_FILE, CD_SVD_FILE
from .config import TrainConfig
from .errors import UserError
from .formats import INIT_FILE, LORA_FILE, PIPELINE_PARTS, SDXL_PIPELINE_PARTS, TI_FILE, read_safetensors

REPORT = "report.json"
LOG = "log.jsonl"
GRID = "samples.png"
CHECKPOINT = "checkpoint"
CHECKPOINT_CONFIG = "config.json"  # in the checkpoint: the config it was trained with, compared on --resume
EVAL = "eval.json"
MERGE_REPORT = "merge.json"
STAGES = ("stage1", "stage2")  # two_stage's sub-runs
# fields that may change between a run and its --resume without making a finished stage stale (two_stage):
# they touch no training (the sample grid and the evaluation are made from the saved files at the end)
BOOKKEEPING = ("resume", "overwrite", "progress", "log_every", "checkpoint_every", "num_samples",
               "sample_steps", "sample_prompt", "evaluate")
# and those that may also change when a checkpoint is resumed: when to stop (the step budget, whose schedule
# follows the new one, and early stopping: e.g. a run DVAR stopped continued to its cap with --early-stop
# none), where the run lives, and switches that change speed or memory, not what a step does (a checkpoint
# resumes on another device), and where e4t's image encoder lives (tuning checks it is the same encoder). Every
# other field must match the checkpoint's: --resume refuses, naming them.
RESUMABLE = BOOKKEEPING + ("max_steps", "stage1_steps", "stage2_steps", "early_stop", "dvar_window",
                           "dvar_threshold", "probe_every", "few_steps", "out", "device", "kernels", "probe_graph",
                           "gradient_checkpointing", "vram", "image_encoder")
PATH_FIELDS = ("model", "images", "class_images", "concepts", "init_embeddings", "domain", "image_encoder")


def _adapter_names() -> set[str]:
    from .plots import PLOT

    return {LORA_FILE, TI_FILE, INIT_FILE, CD_FILE, CD_SVD_FILE, PLOT, *PIPELINE_PARTS, *SDXL_PIPELINE_PARTS}


def is_ours(name: str) -> bool:
    """A name we write into a run folder, or a temporary or previous copy of one."""
    for suffix in (".tmp", ".old"):
        name = name.removesuffix(suffix)
    name = name.replace(".tmp.png", ".png")  # the grid's and the plot's temporaries
    if name.startswith("<") and name.endswith(">.safetensors"):  # Custom Diffusion's token files
        return True
    return name in {REPORT, LOG, GRID, CHECKPOINT, EVAL, MERGE_REPORT, "best", "export", ".pipeline", *STAGES,
                    *_adapter_names()}


def listed(folder: Path) -> set[str]:
    """The entries folder/report.json says the run wrote (its "files"; a staged run's "stages"): ours too,
    whatever a method named them."""
    try:
        report = json.loads((Path(folder) / REPORT).read_text())
        if "config" not in report:
            return set()
        return {str(f).split("/")[0] for f in report.get("files", [])} | set(report.get("stages") or {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return set()


def ours_in(folder: Path):
    """is_ours for the entries of `folder`, counting also what its report lists (listed)."""
    names = listed(folder)
    return lambda name: is_ours(name) or name in names


def _json_object(path: Path, key: str) -> bool:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and key in value


def _our_log(path: Path) -> bool:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return all("step" in json.loads(line) for line in lines[:1])  # empty: killed before the first step
    except (ValueError, TypeError):
        return False


def holds_run(folder: Path) -> bool:
    """True when `folder` holds a run of ours, finished or not, or a merge: told by files only we write."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return (_json_object(folder / REPORT, "config") or _json_object(folder / MERGE_REPORT, "runs")
            or any((folder / name / "state.pt").is_file() for name in (CHECKPOINT, CHECKPOINT + ".old"))
            or (folder / LOG).is_file() and _our_log(folder / LOG)
            or any(holds_run(folder / stage) for stage in STAGES))


def remove_ours(folder: Path) -> None:
    """Delete our files and folders in `folder`; everything else in it stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    ours = ours_in(folder)
    for entry in sorted(folder.iterdir()):
        if ours(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a failed write left in `folder` (and its best/); never checkpoint.old,
    which may be the only complete checkpoint."""
    for parent in (Path(folder), Path(folder) / "best"):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name.endswith((".tmp", ".tmp.png")) and is_ours(entry.name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def refuse_overlap(out: Path, inputs: list[tuple[str, str | os.PathLike | None]]) -> None:
    """A UserError when `out` is, is inside or holds one of the input folders (flag, path): what is written
    there, or removed by --overwrite, could be the user's inputs."""
    target = Path(out).expanduser().resolve()
    for flag, path in inputs:
        if not path:
            continue
        source = Path(path).expanduser().resolve()
        if target == source:
            how = "is"
        elif target.is_relative_to(source):
            how = "is inside"
        elif source.is_relative_to(target):
            how = "holds"
        else:
            continue
        raise UserError(f"--out {out} {how} the {flag} folder {path}; choose an --out outside your input "
                        f"folders, e.g. {source.parent / (source.name + '-run')}")


def check_writable(out: Path) -> None:
    """`out` is, or can be made, a folder we can write into."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable; choose a folder you can write to")


def foreign_files(folder: Path) -> list[str]:
    if not Path(folder).is_dir():
        return []
    ours = ours_in(folder)
    return sorted(p.name for p in Path(folder).iterdir() if not ours(p.name))


def refuse_foreign(out: Path) -> None:
    """--overwrite replaces a run of ours only: in a folder of other files there is nothing of ours to replace."""
    foreign = foreign_files(out)
    if foreign and not holds_run(out):
        raise UserError(f"--overwrite: {out} holds no t2i-fast run (it has {foreign[0]}, ...), so nothing in it "
                        f"is deleted; choose a new or empty --out")


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Before any work: `out` can be a run folder, and what is in it may be replaced or continued."""
    out = Path(out)
    check_writable(out)
    recover(out / CHECKPOINT)
    if resume or not out.is_dir():
        return
    if overwrite:
        refuse_foreign(out)
        return
    if (out / REPORT).is_file():
        raise UserError(f"output folder {out} already holds a finished run ({REPORT}); pass --overwrite to "
                        f"replace it, --resume to continue it, or choose another --out")
    if holds_run(out):
        if has_checkpoint(out):
            raise UserError(f"output folder {out} holds an interrupted run with a checkpoint; pass --resume to "
                            f"continue it, --overwrite to start again, or choose another --out")
        raise UserError(f"output folder {out} holds an interrupted run without a checkpoint; pass --overwrite to "
                        f"start again, or choose another --out")


def has_checkpoint(out: Path) -> bool:
    """A checkpoint in `out` or in one of two_stage's stage folders."""
    return any((Path(out) / stage / CHECKPOINT / "state.pt").is_file() for stage in ("", *STAGES))


def recover(checkpoint: Path) -> None:
    """Put back the previous checkpoint where a kill came between replace_folder's two renames."""
    old = checkpoint.with_name(checkpoint.name + ".old")
    if not checkpoint.exists() and old.is_dir():
        try:
            os.replace(old, checkpoint)
        except FileNotFoundError:  # another rank of a data-parallel run put it back first
            pass


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the complete folder `tmp` at `target`. A folder cannot be renamed over a non-empty one, so the
    previous `target` moves to target.old first and is deleted only once the new one is in place: at every
    moment one complete copy exists (recover() finds it)."""
    recover(target)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def replace_entries(tmp: Path, out: Path) -> list[str]:
    """Move every entry of the folder `tmp` into `out` (replacing what is there), then remove `tmp`."""
    names = sorted(os.listdir(tmp))
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return names


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


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all (through a temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step` (the checkpoint resumed): those after it belong to an attempt that was
    killed, and are written again as the steps are."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            continue
    write_text(path, "".join(keep))


def read_report(run: Path) -> tuple[str, dict]:
    """(method, report) of a finished run folder; a UserError naming the missing file otherwise."""
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist; pass the --out folder of a finished training")
    report_path = run / REPORT
    if not report_path.is_file():
        if (run / CHECKPOINT).is_dir():
            raise UserError(f"{report_path} is missing: the run did not finish; continue it with "
                            f"`t2i-fast train ... --out {run} --resume` (same settings), then export")
        raise UserError(f"{report_path} is missing; {run} is not a finished t2i-fast run (pass the --out folder "
                        f"of a finished training)")
    try:
        report = json.loads(report_path.read_text())
        method = named_method(report)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{report_path} is not a t2i-fast report (no method); the run folder is damaged: "
                        f"train again with --overwrite") from None
    return method, report  # only the file being exported must be there (source_file): not the grid or plot


def named_method(saved: dict) -> str:
    """The method a report (its "method", else its config's) or a checkpoint's config names; KeyError if none."""
    return saved.get("method") or saved["config"]["method"]


def method_of(folder: Path) -> str | None:
    """The method that wrote `folder`: named in its report.json, or, before the report exists (the sample
    grid is drawn first), in its final checkpoint's config; None where neither is readable (a merge, bare
    files)."""
    for path in (folder / REPORT, folder / CHECKPOINT / CHECKPOINT_CONFIG):
        try:
            return named_method(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def _normal(name: str, value):
    return str(Path(value).expanduser().resolve()) if name in PATH_FIELDS and value else value


def field_defaults() -> dict:
    """TrainConfig's fields with a default, and the default."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def config_differences(saved: dict, now: dict, free=RESUMABLE) -> list[tuple[str, object, object]]:
    """(field, saved value, value now) of each field outside `free` that differs (paths compared resolved)."""
    now = json.loads(json.dumps(now))  # tuples as lists, as they come back from JSON
    # a field added since the checkpoint was written is compared as its default, which the checkpoint trained with
    added = {k: v for k, v in json.loads(json.dumps(field_defaults())).items() if k not in saved}
    saved = {**saved, **added}
    return [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in free and _normal(k, saved.get(k)) != _normal(k, now.get(k))]


def refuse_changed_config(checkpoint: Path, now: dict) -> None:
    """--resume continues what the checkpoint trained: a UserError naming every training setting that differs
    from the checkpoint's (a checkpoint written before configs were stored is taken as it is)."""
    path = checkpoint / CHECKPOINT_CONFIG
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"--resume: {path} is damaged; start again with --overwrite") from None
    diffs = config_differences(saved, now)
    if diffs:
        flags = lambda i: " ".join(f"--{d[0].replace('_', '-')} {d[i]}" for d in diffs)  # noqa: E731
        raise UserError(f"--resume: {checkpoint} was trained with {flags(1)}, not {flags(2)}; resume with the "
                        f"checkpoint's settings, or start again with --overwrite or another --out")


def refuse_non_finite(folder: Path, names: list[str] | None = None) -> None:
    """Read every tensor file of an adapter (a run folder, its pipeline parts, or the files `names`) through
    read_safetensors, which refuses NaN or infinite values: diffusers' own loaders would load them."""
    folder = Path(folder)
    names = sorted(os.listdir(folder)) if names is None else names
    for name in names:
        path = folder / name
        if path.suffix == ".safetensors" and path.is_file():
            read_safetensors(path)
        elif name in ("unet", "text_encoder", "text_encoder_2") and path.is_dir():
            for part in sorted(path.glob("*.safetensors")):
                read_safetensors(part)


WRITE_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                errno.EROFS: "choose a folder you can write to", errno.EACCES: "choose a folder you can write to",
                errno.EPERM: "choose a folder you can write to"}


@contextlib.contextmanager
def write_errors(out: Path):
    """A disk-full or permission error while writing the run: one line naming the file, the temporaries
    removed (the complete files and checkpoint written before stay)."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        remove_temporaries(out)
        for stage in STAGES:
            remove_temporaries(Path(out) / stage)
        then = "then continue with --resume" if has_checkpoint(out) else "then run again with --overwrite"
        raise UserError(f"could not write {e.filename or out} ({os.strerror(e.errno)}); {WRITE_ERRORS[e.errno]}, "
                        f"{then}") from None
