"""Generate images with a base model plus any method's adapter folder, through diffusers' own loaders."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapter_files import fuse_loaded_loras
from .errors import UserError
from .formats import LORA_FILE, TI_FILE
from .methods import REGISTRY, get_method
from .methods.base import MethodSpec
from .multi_adapter import MultiAdapter
from .run_folder import method_of, refuse_non_finite
from .runtime import check_resolution, resolve_device


def load_adapter(pipe, adapter: str | os.PathLike) -> list[str]:
    """Load every adapter file found in `adapter` (a run folder or a single file) into `pipe`, as the method
    that wrote it reads its files (the method named in the folder's report.json; every known layout where
    there is none).

    A run folder that is a diffusers pipeline (model_index.json, unet/) has its UNet, text encoder and
    tokenizer swapped in first. Returns the names of the files (parts) loaded; a UserError if none.
    """
    path = Path(adapter).expanduser()
    if path.is_file():
        folder, names = path.parent, [path.name]
    elif path.is_dir():
        folder, names = path, sorted(os.listdir(path))
    else:
        raise UserError(f"adapter {path} does not exist; pass a training output folder")
    refuse_non_finite(folder, names)  # diffusers' loaders below would load NaN weights without a word
    method = method_of(folder) if path.is_dir() else None  # a bare file, a merge: no report
    loaded = (get_method(method) if method in REGISTRY else MethodSpec).load(pipe, folder, names)
    if not loaded:
        raise UserError(f"{path} holds no adapter file ({LORA_FILE}, {TI_FILE} or a pipeline's unet/); pass a "
                        f"finished run folder")
    return loaded


def build_pipeline(model: str | os.PathLike, adapter: str | os.PathLike | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, progress: bool = True):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL model) from a local model with an adapter
    loaded, on `device`."""
    from .models import load_components, set_offline

    set_offline()  # before diffusers (and the hub client it imports) reads the flags
    from diffusers import DPMSolverMultistepScheduler

    path = Path(model).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):  # through the loader training used
        pipe = load_components(path, dtype).pipeline()
    else:
        pipe = pipeline_from_folder(path, dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if adapter is not None:
        load_adapter(pipe, adapter)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def pipeline_from_folder(path: Path, dtype: torch.dtype = torch.float32):
    """diffusers' StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL folder, from a local folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .models import check_model_folder, is_sdxl_folder, pipeline_dtype

    check_model_folder(path)
    if is_sdxl_folder(path):  # SDXL has no safety checker to switch off
        return StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                         **pipeline_dtype(dtype))
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True, use_safetensors=True,
                                                   **pipeline_dtype(dtype))


class MultiAdapterPipeline(MultiAdapter):
    """N LoRA / Custom Diffusion adapters on one base model, mixed in one batch (multi_adapter.py):
    `MultiAdapterPipeline(model, [run1, run2]).generate(prompts, adapters=[0, 1, -1], seeds=[...])`; image i
    equals `generate(build_pipeline(model, run_i), prompt_i, n=1, seed=seeds[i])` up to float rounding."""

    def __init__(self, model: str | os.PathLike, adapters: list[str | os.PathLike], device: str = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = False):
        super().__init__(build_pipeline(model, device=str(resolve_device(device)), dtype=dtype, progress=progress),
                         adapters)


def make_grid(images, cols: int | None = None):
    """Tile PIL images (all the same size) into one image, `cols` wide (default: near-square)."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    cols = cols or int(len(images) ** 0.5 + 0.999)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def generate(pipe, prompt: str, n: int = 4, seed: int = 0, steps: int = 30, guidance: float = 7.5,
             resolution: int | None = None, negative_prompt: str | None = None, batch: int = 4):
    """n PIL images for `prompt`, image i drawn from its own generator seeded seed + i, so any one can be
    regenerated alone (up to float rounding). They are denoised `batch` at a time: one UNet call per step
    for the batch instead of one per image, which is most of the time on small models."""
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, n, batch):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, min(n, start + batch))]
        images += pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       num_images_per_prompt=len(generators), generator=generators,
                       negative_prompt=negative_prompt).images
    return images


def check_sampling(n: int, steps: int, resolution: int | None, batch: int | None = None) -> None:
    """The sampling options, checked before any model is loaded."""
    for flag, value in (("--n", n), ("--steps", steps), ("--batch", 1 if batch is None else batch)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    check_resolution(resolution)


def save_grid(images, path: Path, cols: int | None = None) -> None:
    """The images tiled into one PNG at `path`, written whole or not at all."""
    tmp = path.with_suffix(".tmp.png")
    make_grid(images, cols).save(tmp)
    os.replace(tmp, path)


def sampling_pipeline(model, adapter=None, device: str = "cpu", progress: bool = True):
    """build_pipeline for a pipeline that only generates: a LoRA it loads is folded into the weights."""
    pipe = build_pipeline(model, adapter, device=device, progress=progress)
    fuse_loaded_loras(pipe)
    return pipe


def sample(model, adapter=None, prompt: str = "a photo of <sks>", n: int = 4, seed: int = 0, steps: int = 30,
           guidance: float = 7.5, resolution: int | None = None, out: str | os.PathLike | None = None,
           grid_path: str | os.PathLike | None = None, device: str = "cpu", progress: bool = True, pipe=None,
           batch: int = 4):
    """Generate n images with model + adapter, `batch` per UNet pass; write PNGs into `out` and/or a grid to
    `grid_path`. pipe: the sampling_pipeline(model, adapter, device) the caller built already (then nothing is
    loaded here)."""
    check_sampling(n, steps, resolution, batch)
    device = str(resolve_device(device))  # checked before the model is loaded
    if pipe is None:
        pipe = sampling_pipeline(model, adapter, device=device, progress=progress)
    images = generate(pipe, prompt, n, seed, steps, guidance, resolution, batch=batch)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(out / f"{i:03d}_seed{seed + i}.png")
        grid_path = grid_path or out / "grid.png"
    if grid_path is not None:
        save_grid(images, Path(grid_path))
    return images


def sample_many(model, adapters: list, prompts: list[str], n: int = 4, seed: int = 0, steps: int = 30,
                guidance: float = 7.5, resolution: int | None = None, out: str | os.PathLike | None = None,
                device: str = "cpu", progress: bool = False, batch: int | None = None):
    """n images per adapter (prompts: one for all, or one per adapter), image i of each from seed + i as a
    single-adapter `sample` would draw it, all in one batch (MultiAdapterPipeline), or `batch` images at a
    time. Writes a<k>_<i>_seed<s>.png and a grid with one row per adapter into `out`. Returns the images,
    adapter-major."""
    check_sampling(n, steps, resolution, batch)
    if len(prompts) not in (1, len(adapters)):
        raise UserError(f"{len(prompts)} prompts for {len(adapters)} adapters; give --prompt once, or once per "
                        f"--adapter in the same order")
    prompts = list(prompts) * len(adapters) if len(prompts) == 1 else list(prompts)
    pipe = MultiAdapterPipeline(model, adapters, device=device, progress=progress)
    ids = [k for k in range(len(adapters)) for _ in range(n)]
    seeds = [seed + i for _ in adapters for i in range(n)]
    images = pipe.generate([prompts[k] for k in ids], adapters=ids, seeds=seeds, steps=steps, guidance=guidance,
                           resolution=resolution, batch=batch)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for j, img in enumerate(images):
            img.save(out / f"a{ids[j]}_{j % n:03d}_seed{seed + j % n}.png")
        save_grid(images, out / "grid.png", cols=n)
    return images
