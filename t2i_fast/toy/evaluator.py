"""Did personalization learn the concept?  Subject fidelity, prompt fidelity and preservation.

  subject_fidelity   mean cosine similarity, under the toy image encoder (encoder.py, our DINO analogue),
                     between images generated for "a photo of {token} {class}" / "{token} {class} on a
                     {bg} background" and the concept's reference images (all pairs).
  prompt_fidelity    fraction of images generated for "{token} {class} on a black background", "a red
                     {token} {class}", ... whose stated attribute can be read back from the pixels
                     (background from the border, colour from the object's majority colour).
  preservation       for prompts without the token, mean cosine similarity (same encoder) between the
                     personalized model's and the base model's images at the same seeds (1.0 = unchanged).

    t2i-fast eval RUN            # RUN: a training output folder with report.json and the adapter
    python -m t2i_fast.toy.validate   # re-measure the metrics' validation -> VALIDATION.md (validate.py
                                      # sits above this module: it scores with it)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..adapter_files import fuse_loaded_loras
from ..errors import UserError
from ..sampling import load_adapter  # the one loader of run folders, as `t2i-fast sample` loads them
from . import concept_specs as _concepts
from . import encoder as _encoder
from . import world
from .world import default_model_path, is_bundled_model

GUIDANCE = 7.5
STEPS = 12
# what a training run's own evaluation (report.json, eval.json) and `t2i-fast eval` use by default
EVAL_IMAGES, EVAL_STEPS = 4, STEPS
SUBJECT_PROMPTS = ("a photo of {token} {cls}", "{token} {cls} on a gray background")
ATTRIBUTE_PROMPTS = (  # (prompt, attribute, value)
    ("{token} {cls} on a black background", "background", "black"),
    ("{token} {cls} on a white background", "background", "white"),
    ("a red {token} {cls}", "color", "red"),
    ("a blue {token} {cls}", "color", "blue"),
)
PRESERVATION_PROMPTS = ("a red circle on a white background", "a large green triangle", "a {cls}",
                        "a blue square on a black background")


# -------------------------------------------------------------------------------------------- models
def load_pipeline(model_dir=None):
    """The bundled (or given) toy pipeline on the CPU in fp32, progress bars off."""
    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir or default_model_path())
    if not (model_dir / "model_index.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json); "
                                "run `python -m t2i_fast.toy.pretrain` to build the bundled model")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 64) -> np.ndarray:
    """One image per (prompt, seed) pair, in order: (len(prompts), H, W, 3) uint8.  DDIM, CPU generators."""
    from diffusers import DDIMScheduler

    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config)
    try:
        out = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
            img = pipe(prompt=list(prompts[i:i + batch]), generator=gens, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="np").images
            out.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    finally:
        pipe.scheduler = old
    return np.concatenate(out)


def _model_digest(model_dir: Path) -> str:
    """A digest of a model folder's weights and configs: what its images depend on."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(str(path.relative_to(model_dir)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def base_images(pipe, model_dir, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """The base model's images for the preservation prompts, which depend on the base model and the settings
    only: generated once (with `pipe`, else a pipeline loaded from model_dir) and kept under cache_dir(), so
    that every later score of a run of the same model skips them (16 of the 56 images of a run's evaluation,
    ~0.8 s on one core). The key covers the model's files, the prompts, seeds and settings and the library
    versions; a cache that cannot be written is skipped."""
    import diffusers

    from ..runtime import cache_dir

    key = hashlib.sha256(json.dumps([_model_digest(Path(model_dir)), prompts, seeds, steps, guidance,
                                     torch.__version__, diffusers.__version__]).encode()).hexdigest()[:32]
    path = cache_dir() / "toy-eval-base" / f"{key}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    images = generate(pipe if pipe is not None else load_pipeline(model_dir), prompts, seeds, steps, guidance)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, path)
    except OSError:
        pass
    return images


# ------------------------------------------------------------------------------------------- metrics
def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j) under the toy encoder."""
    ea, eb = _encoder.embed(a), _encoder.embed(b)
    return float((ea @ eb.T).mean())


def self_similarity(a: np.ndarray) -> float:
    """Mean cosine similarity over distinct pairs within a."""
    e = _encoder.embed(a)
    s = e @ e.T
    n = len(a)
    return float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def attribute_ok(img: np.ndarray, attribute: str, value: str) -> bool:
    if attribute == "background":
        return world.read_background(img) == value
    if attribute == "color":
        return world.read_color(img) == value
    if attribute == "shape":
        return world.read_shape(img) == value
    if attribute == "position":
        return world.read_position(img) == value
    raise ValueError(attribute)


def _references(concept_name) -> np.ndarray:
    return _concepts.load_images(concept_name)


def evaluate(pipeline_or_model_dir=None, token: str = "<sks>", class_word: str = "shape", concept_name=None,
             adapter_dir=None, seeds=None, n_images: int = 4, num_inference_steps: int = STEPS,
             guidance_scale: float = GUIDANCE, base_model=None, preservation: bool = True,
             return_images: bool = False) -> dict:
    """Score a personalized toy model on a concept.

    pipeline_or_model_dir: a StableDiffusionPipeline (already personalized, or the base when adapter_dir is
    given) or a model folder (default: the bundled model).  adapter_dir: a training output folder, loaded as
    `t2i-fast sample` loads it (sampling.load_adapter: diffusers' own loaders for the files they read).
    concept_name: a bundled concept name or a folder of reference images.  base_model: the un-personalized
    model for preservation (default: the bundled model; with adapter_dir, the pipeline before loading).
    seeds: the generation seeds (default range(n_images)).  Returns a dict of floats (+ counts, timing).
    """
    t0 = time.time()
    seeds = list(seeds if seeds is not None else range(n_images))
    if concept_name is None:
        raise ValueError("evaluate needs concept_name: a bundled concept name or a folder of reference images")
    refs = _references(concept_name)
    pipe = pipeline_or_model_dir
    own_pipeline = pipe is None or isinstance(pipe, (str, Path))  # a caller's pipeline keeps its LoRA layers
    if own_pipeline:
        pipe = load_pipeline(pipe)
    kw = dict(steps=num_inference_steps, guidance=guidance_scale)
    pres_prompts = [p.format(cls=class_word) for p in PRESERVATION_PROMPTS]
    pp = [p for p in pres_prompts for _ in seeds]
    ps = [s for _ in pres_prompts for s in seeds]
    base_imgs = None
    if preservation:
        base_dir = default_model_path() if base_model is None else base_model
        if adapter_dir is not None and base_model is None:  # `pipe` is the base until the adapter is loaded
            base_imgs = base_images(pipe, base_dir, pp, ps, **kw)
        else:
            base_imgs = base_images(None, base_dir, pp, ps, **kw)
    if adapter_dir is not None:
        load_adapter(pipe, adapter_dir)
        if own_pipeline:
            fuse_loaded_loras(pipe)  # a pipeline that only generates: the LoRA costs nothing per image

    subj = [p.format(token=token, cls=class_word) for p in SUBJECT_PROMPTS]
    attr = [(p.format(token=token, cls=class_word), a, v) for p, a, v in ATTRIBUTE_PROMPTS]
    prompts = subj + [p for p, _, _ in attr] + (pres_prompts if preservation else [])
    imgs = generate(pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds], **kw)
    k = len(seeds)
    subj_imgs = imgs[:len(subj) * k]
    attr_imgs = imgs[len(subj) * k:(len(subj) + len(attr)) * k]
    result: dict = dict(subject_fidelity=similarity(subj_imgs, refs))
    per_attr: dict[str, list[bool]] = {}
    for j, (p, a, v) in enumerate(attr):
        oks = [attribute_ok(im, a, v) for im in attr_imgs[j * k:(j + 1) * k]]
        per_attr.setdefault(a, []).extend(oks)
    result["prompt_fidelity"] = float(np.mean([x for v in per_attr.values() for x in v]))
    result.update({f"prompt_fidelity_{a}": float(np.mean(v)) for a, v in per_attr.items()})
    result["subject_fidelity_attribute_prompts"] = similarity(attr_imgs, refs)
    if preservation:
        pers = imgs[(len(subj) + len(attr)) * k:]
        ea, eb = _encoder.embed(pers), _encoder.embed(base_imgs)
        result["preservation"] = float((ea * eb).sum(-1).mean())
    result.update(reference_self_similarity=self_similarity(refs), n_images=k,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  seconds=round(time.time() - t0, 2))
    if return_images:
        result["images"] = imgs
    return result


# ----------------------------------------------------------------------------------------------- CLI
def _concept_of(images: str | None) -> str | None:
    if images is None:
        return None
    p = Path(images)
    if p.resolve().parent == _concepts.CONCEPTS_DIR.resolve() and p.name in _concepts.SPECS:
        return p.name
    return str(p)


def evaluate_run(run_dir, n_images: int = EVAL_IMAGES, num_inference_steps: int = EVAL_STEPS, pipeline=None) -> dict:
    """Evaluate a training output folder (report.json + adapter files); writes RUN/eval.json. pipeline: this run
    loaded already (the base model with the run's adapter, as sampling.sampling_pipeline builds it for the sample
    grid); used where it is on the CPU in float32, as the evaluator's own would be, instead of loading the run
    again."""
    run = Path(run_dir)
    rp = run / "report.json"
    if not rp.exists():
        raise UserError(f"{rp} is missing: pass the output folder of `t2i-fast train`")
    from ..run_folder import refuse_non_finite

    refuse_non_finite(run)  # diffusers' loaders would load NaN weights without a word
    report = json.loads(rp.read_text())
    cfg = report.get("config", report)
    model = cfg.get("model") or str(default_model_path())
    if not is_bundled_model(model):  # its scores read the toy world's shapes and colours from the pixels
        raise UserError(f"{run} was trained on {model}, not the bundled toy model; the toy evaluator scores only "
                        f"runs of the bundled model (train without --model)")
    token = cfg.get("token") or "<sks>"
    class_word = cfg.get("class_word") or "shape"
    concept = _concept_of(cfg.get("images")) or cfg.get("concept")
    if concept is None:
        raise UserError(f"{rp}: no 'images' folder in the config, so there are no reference images")
    if pipeline is not None and pipeline.device.type == "cpu" and pipeline.unet.dtype == torch.float32:
        res = evaluate(pipeline, token, class_word, concept, base_model=model, n_images=n_images,
                       num_inference_steps=num_inference_steps)
    elif (run / "model_index.json").exists():  # a full pipeline (DreamBooth)
        res = evaluate(str(run), token, class_word, concept, base_model=model, n_images=n_images,
                       num_inference_steps=num_inference_steps)
    else:
        res = evaluate(model, token, class_word, concept, adapter_dir=run, n_images=n_images,
                       num_inference_steps=num_inference_steps)
    tmp = run / "eval.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(run / "eval.json")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i-fast eval", description="score a personalization run on the toy world")
    p.add_argument("run", help="training output folder (report.json + adapter)")
    p.add_argument("--n-images", type=int, default=EVAL_IMAGES,
                   help=f"images per prompt (more: steadier scores, slower) [default: {EVAL_IMAGES}, as training's]")
    p.add_argument("--steps", type=int, default=EVAL_STEPS,
                   help=f"denoising steps per image [default: {EVAL_STEPS}, as training's]")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    try:
        res = evaluate_run(a.run, n_images=a.n_images, num_inference_steps=a.steps)  # rewrites RUN/eval.json
    except (UserError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
