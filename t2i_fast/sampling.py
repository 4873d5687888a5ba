"""Generate images with a base model plus any method's adapter folder, through diffusers' own loaders."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .cd_files import CD_FILE, CD_SVD_FILE, install_processors, load_compressed, token_files
from .errors import UserError
from .formats import INIT_FILE, LORA_FILE, TI_FILE, load_textual_inversion, read_safetensors
from .notices import dropped
from .runtime import check_resolution, resolve_device


OTHER_BASE = "the adapter was made for another base model: load it on the model it was trained on"


def check_width(pipe, path: Path, token: str, vectors: torch.Tensor) -> None:
    """Token vectors as wide as pipe's text encoder (diffusers' loader would fail with a bare ValueError)."""
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    if vectors.shape[-1] != width:
        raise UserError(f"{path}: {token!r} has {vectors.shape[-1]}-wide vectors but this model's text encoder's "
                        f"are {width}-wide; {OTHER_BASE}")


def load_token_file(pipe, path: Path, token: str | None = None) -> str:
    """A {token: vectors} file (textual inversion, a Custom Diffusion modifier) through diffusers'
    load_textual_inversion, unless the tokenizer holds its token already; checked first. Returns the token."""
    file_token, vectors = load_textual_inversion(path)
    token = token or file_token
    if token not in pipe.tokenizer.get_vocab():
        check_width(pipe, path, token, vectors)
        pipe.load_textual_inversion(str(path), token=token)
    return token


def load_init_embeddings(pipe, path: Path) -> list[str]:
    """The frozen tokens a LoRA run was trained with (its copy of --init-embeddings), each through diffusers'
    load_textual_inversion, unless the tokenizer holds it already. Returns [path.name] if any was loaded."""
    from .methods.lora import read_init_embeddings

    new = {t: v for t, v in read_init_embeddings(path).items() if t not in pipe.tokenizer.get_vocab()}
    for token, vectors in new.items():
        check_width(pipe, path, token, vectors)
        pipe.load_textual_inversion({token: vectors}, token=token)
    return [path.name] if new else []


def check_lora(pipe, path: Path) -> bool:
    """Check a diffusers-layout LoRA file against pipe before diffusers loads it (which would fail with a
    traceback): readable, and every lora_A (r, in) / lora_B (out, r) fits its layer. Returns whether the file
    has text-encoder keys. Keys of other layouts (kohya) are left to diffusers."""
    tensors, _ = read_safetensors(path)
    for key, tensor in tensors.items():
        end = next((e for e in (".lora_A.weight", ".lora_B.weight") if key.endswith(e)), None)
        prefix, _, module_path = key[: -len(end)].partition(".") if end else ("", "", "")
        model = getattr(pipe, prefix, None) if prefix in ("unet", "text_encoder") else None
        if model is None:
            continue
        # transformers 5 flattened CLIPTextModel (no text_model.): a file may name the layer either way
        paths = [module_path, module_path.removeprefix("text_model."), "text_model." + module_path]
        layer = next((model.get_submodule(p) for p in paths if _has_submodule(model, p)), None)
        if layer is None or not hasattr(layer, "weight"):
            raise UserError(f"{path}: layer {prefix}.{module_path} does not exist in this model; {OTHER_BASE}")
        dim = 1 if end == ".lora_A.weight" else 0  # A reads the layer's input, B writes its output
        if tensor.dim() != 2 or tensor.shape[dim] != layer.weight.shape[dim]:
            raise UserError(f"{path}: {key} has shape {tuple(tensor.shape)}, which does not fit this model's layer "
                            f"of shape {tuple(layer.weight.shape)}; {OTHER_BASE}")
    return any(k.startswith("text_encoder.") for k in tensors)


def _has_submodule(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def load_lora(pipe, folder: str | os.PathLike, weight_name: str = LORA_FILE) -> None:
    """pipe.load_lora_weights, checked first (check_lora), without diffusers' notice that a UNet-only file has no
    text-encoder keys (it says itself that this is safe to ignore, and every UNet LoRA would print it)."""
    has_text_encoder = check_lora(pipe, Path(folder) / weight_name)
    quiet = dropped("diffusers.loaders.lora_base", "No LoRA keys associated to")
    with quiet if not has_text_encoder else contextlib.nullcontext():
        pipe.load_lora_weights(str(folder), weight_name=weight_name)


def load_custom_diffusion(pipe, folder: Path, names: list[str]) -> list[str]:
    """Load a Custom Diffusion run (or merge) from `folder` into `pipe`: the processors (full file, else the
    SVD-compressed one on top of pipe's UNet) and its token files. Returns the files loaded."""
    loaded = []
    if CD_FILE in names:
        state, _ = read_safetensors(folder / CD_FILE)
        install_processors(pipe.unet, state, folder / CD_FILE)
        loaded.append(CD_FILE)
    elif CD_SVD_FILE in names:
        install_processors(pipe.unet, load_compressed(folder / CD_SVD_FILE, pipe.unet), folder / CD_SVD_FILE)
        loaded.append(CD_SVD_FILE)
    for name in token_files(folder, names):
        load_token_file(pipe, folder / name)
        loaded.append(name)
    return loaded


def load_pipeline_parts(pipe, folder: Path) -> list[str]:
    """Swap the UNet, text encoder and tokenizer of a saved pipeline folder (a dreambooth run, two_stage with
    a full stage 2) into `pipe`, in its dtype and on its device. Returns the parts loaded."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    dtype, device = pipe.unet.dtype, pipe.unet.device
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                          local_files_only=True, use_safetensors=True).to(device)}
    if (folder / "text_encoder").is_dir():
        parts["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype,
                                                              local_files_only=True, use_safetensors=True).to(device)
    if (folder / "tokenizer").is_dir():
        parts["tokenizer"] = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    pipe.register_modules(**parts)
    return list(parts)


def load_adapter(pipe, adapter: str | os.PathLike) -> list[str]:
    """Load every adapter file found in `adapter` (a run folder or a single file) into `pipe`.

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
    from .run_folder import refuse_non_finite

    refuse_non_finite(folder, names)  # diffusers' loaders below would load NaN weights without a word
    loaded = []
    pipeline = "model_index.json" in names and (folder / "unet").is_dir()
    if pipeline:
        loaded += load_pipeline_parts(pipe, folder)
    if TI_FILE in names:
        token, _ = load_textual_inversion(folder / TI_FILE)
        if not (pipeline and token in pipe.tokenizer.get_vocab()):  # the saved tokenizer may hold it already
            load_token_file(pipe, folder / TI_FILE)
            loaded.append(TI_FILE)
    if INIT_FILE in names:
        loaded += load_init_embeddings(pipe, folder / INIT_FILE)
    if LORA_FILE in names:
        load_lora(pipe, folder)
        loaded.append(LORA_FILE)
    loaded += load_custom_diffusion(pipe, folder, names)  # its processors and <token>.safetensors files
    if not loaded:
        raise UserError(f"{path} holds no adapter file ({LORA_FILE}, {TI_FILE} or a pipeline's unet/); pass a "
                        f"finished run folder")
    return loaded


def build_pipeline(model: str | os.PathLike, adapter: str | os.PathLike | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, progress: bool = True):
    """A StableDiffusionPipeline from a local model with an adapter loaded, on `device`."""
    from .models import check_model_folder, load_components, pipeline_dtype, set_offline

    set_offline()  # before diffusers (and the hub client it imports) reads the flags
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    path = Path(model).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):  # through the loader training used
        pipe = load_components(path, dtype).pipeline()
    else:
        check_model_folder(path)
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True, use_safetensors=True,
                                                       **pipeline_dtype(dtype))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if adapter is not None:
        load_adapter(pipe, adapter)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


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
             resolution: int | None = None, negative_prompt: str | None = None):
    """n PIL images for `prompt`, image i from seed + i (so any one can be regenerated alone)."""
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for i in range(n):
        gen = torch.Generator("cpu").manual_seed(seed + i)
        images += pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=gen, negative_prompt=negative_prompt).images
    return images


def sample(model, adapter=None, prompt: str = "a photo of <sks>", n: int = 4, seed: int = 0, steps: int = 30,
           guidance: float = 7.5, resolution: int | None = None, out: str | os.PathLike | None = None,
           grid_path: str | os.PathLike | None = None, device: str = "cpu", progress: bool = True):
    """Generate n images with model + adapter; write PNGs into `out` and/or a grid to `grid_path`."""
    for flag, value in (("--n", n), ("--steps", steps)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    check_resolution(resolution)
    device = str(resolve_device(device))  # checked before the model is loaded
    pipe = build_pipeline(model, adapter, device=device, progress=progress)
    images = generate(pipe, prompt, n, seed, steps, guidance, resolution)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(out / f"{i:03d}_seed{seed + i}.png")
        grid_path = grid_path or out / "grid.png"
    if grid_path is not None:
        grid = make_grid(images)
        tmp = Path(grid_path).with_suffix(".tmp.png")
        grid.save(tmp)
        os.replace(tmp, grid_path)
    return images
