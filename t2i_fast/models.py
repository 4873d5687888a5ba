"""Load SD 1.x / 2.x components from local files only: a diffusers folder or a single .safetensors file.

The network is never reached: the Hugging Face offline flags are set before diffusers is imported, and
every loader is called with local_files_only. A missing file is a UserError naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def set_offline() -> None:
    """Forbid hub downloads for this process (diffusers, transformers and huggingface_hub honour these), and
    defer the imports diffusers makes that a run does not use (lazy_imports): called before diffusers is."""
    from .lazy_imports import defer_unused_imports

    defer_unused_imports()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pipeline_dtype(dtype) -> dict:
    """The dtype keyword of diffusers' pipeline loaders: `dtype` where diffusers has it (it deprecates
    `torch_dtype`, with a warning on every load), else `torch_dtype`."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils
    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


@dataclass
class Components:
    """The parts of an SD pipeline that personalization touches. family: 'sd1' | 'sd2';
    prediction_type: 'epsilon' | 'v_prediction'."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    family: str
    prediction_type: str
    path: Path

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def pipeline(self, scheduler=None):
        """A StableDiffusionPipeline over these very modules (no copy)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )


def detect_family(unet_config: dict, text_config: dict | None = None) -> str:
    """SD 2.x uses a 1024-wide OpenCLIP text encoder and per-block head dims; 1.x uses 768 (or smaller)."""
    cross = unet_config.get("cross_attention_dim")
    if cross == 1024:
        return "sd2"
    if cross == 2048 or unet_config.get("addition_embed_type") == "text_time":
        raise UserError("SDXL models are not supported yet; use an SD 1.x or 2.x model")
    return "sd1"


def check_model_folder(path: Path) -> None:
    """Raise a UserError naming the first missing file of a diffusers SD folder."""
    if not path.exists():
        raise UserError(f"model {path} does not exist; pass a local diffusers folder or .safetensors file")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path / 'model_index.json'} is missing; {path} is not a diffusers pipeline folder "
                        f"(save one with pipeline.save_pretrained, or pass a .safetensors checkpoint)")
    for name in COMPONENTS:
        sub = path / name
        if not sub.is_dir():
            raise UserError(f"model folder {path} has no {name}/ folder; it must hold {', '.join(COMPONENTS)}")
    for name in ("unet", "vae", "text_encoder"):
        cfg = path / name / "config.json"
        if not cfg.is_file():
            raise UserError(f"{cfg} is missing; the {name} of {path} cannot be loaded")
        suffixes = {f.suffix for f in (path / name).iterdir()}
        if ".safetensors" not in suffixes and ".bin" in suffixes:  # pickle, which can run code on load
            raise UserError(f"{path / name} holds only .bin weights and t2i_fast reads safetensors only; convert "
                            f"the model once with StableDiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                            f"and pass NEW_DIR")
        if ".safetensors" not in suffixes:
            raise UserError(f"{path / name} holds no weights (*.safetensors); the model folder is incomplete")


def load_components(model: str | os.PathLike, torch_dtype=None, weights: bool = True) -> Components:
    """Load the UNet, VAE, text encoder, tokenizer and noise scheduler of a local SD 1.x/2.x model.
    weights=False builds the three networks from their configs on the meta device, reading no weights (the
    memory planner traces a step with them)."""
    set_offline()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".ckpt":  # a pickle, which can run code on load
        raise UserError(f"{path} is a pickle checkpoint and t2i_fast reads safetensors only; convert it once to a "
                        f"diffusers folder (StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)) "
                        f"and pass DIR")
    if path.is_file() and path.suffix == ".safetensors":
        return _load_single_file(path, torch_dtype)
    check_model_folder(path)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = dict(local_files_only=True, use_safetensors=True)
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    try:
        if weights:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
        else:
            unet, vae, text_encoder = _on_meta(path, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
    return _finish(unet, vae, text_encoder, tokenizer, scheduler, path)


def _on_meta(path: Path, torch_dtype=None):
    """The UNet, VAE and text encoder of a model folder, from their configs, with meta-device parameters."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
    if torch_dtype is not None:
        unet, vae, text_encoder = (m.to(torch_dtype) for m in (unet, vae, text_encoder))
    return unet, vae, text_encoder


def _finish(unet, vae, text_encoder, tokenizer, scheduler, path: Path) -> Components:
    family = detect_family(dict(unet.config), None)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"{path}: prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, family, prediction, path)


def _load_single_file(path: Path, torch_dtype=None) -> Components:
    """Single-file checkpoints need a config that diffusers would fetch from the hub; offline it works only
    when that config is already in the local cache. Otherwise tell the user how to convert."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True,
                                                       **pipeline_dtype(torch_dtype))
    except Exception as e:  # diffusers raises many types here; all mean "cannot do it offline"
        raise UserError(
            f"{path} cannot be loaded offline ({type(e).__name__}); convert it once to a diffusers folder on a "
            f"machine with its config (e.g. StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)) "
            f"and pass DIR") from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return _finish(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, path)


def read_model_index(path: str | os.PathLike) -> dict:
    p = Path(path) / "model_index.json"
    return json.loads(p.read_text()) if p.is_file() else {}
