"""Load SD 1.x / 2.x / SDXL components from local files only: a diffusers folder or a single .safetensors file.

SDXL brings a second text encoder (CLIPTextModelWithProjection) and tokenizer; a refiner-only model (no first
text encoder, aesthetic-score conditioning) is refused: it is not a model one personalizes.

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
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


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
    """The parts of an SD pipeline that personalization touches. family: 'sd1' | 'sd2' | 'sdxl';
    prediction_type: 'epsilon' | 'v_prediction'. SDXL adds text_encoder_2 (CLIPTextModelWithProjection)
    and tokenizer_2; they are None for the other families."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    family: str
    prediction_type: str
    path: Path
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def text_encoders(self) -> tuple:
        """The text encoders, first to last (one, or SDXL's two)."""
        return tuple(m for m in (self.text_encoder, self.text_encoder_2) if m is not None)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def pipeline(self, scheduler=None):
        """A StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) over these very modules (no copy)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=scheduler or self.scheduler)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )


def detect_family(unet_config: dict, text_config: dict | None = None) -> str:
    """SD 2.x uses a 1024-wide OpenCLIP text encoder and per-block head dims; 1.x uses 768 (or smaller); SDXL's
    UNet takes added text/time conditioning (and 2048-wide text features at full size)."""
    cross = unet_config.get("cross_attention_dim")
    if cross == 2048 or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cross == 1024:
        return "sd2"
    return "sd1"


def family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def refuse_family(family: str | None, allowed: tuple[str, ...], what: str, model, hint: str = "") -> None:
    """One line where `what` (a method, a command) cannot use a model of `family`; None (unknown) passes."""
    if family is None or family in allowed:
        return
    expected = " or ".join(family_name(f) for f in allowed)
    raise UserError(f"{what} supports {expected} models only, but {model} is an {family_name(family)} model; "
                    f"pass an {expected} model{hint}")


def peek_family(model) -> str | None:
    """The family of a local model from its UNet config (a folder) or its tensor names (a .safetensors file),
    without loading weights; None where it cannot be told (missing or unreadable: loading says why)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            return detect_family(json.loads((path / "unet" / "config.json").read_text()))
        if path.is_file() and path.suffix == ".safetensors":
            return _single_file_family(path)
    except Exception:  # noqa: BLE001 - unreadable here means unknown; loading it says what is wrong
        return None
    return None


def _single_file_family(path: Path) -> str | None:
    """SDXL checkpoints (original layout) hold their two text encoders under conditioner.embedders.{0,1}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    return None  # SD 1.x or 2.x, or not a checkpoint: the loader decides


def is_refiner(index: dict, path: Path) -> bool:
    """An SDXL refiner-only model: aesthetic-score conditioning, text_encoder_2 without a text_encoder."""
    no_first = index.get("text_encoder", [None])[0] is None or not (path / "text_encoder").is_dir()
    return bool(index.get("requires_aesthetics_score")) or (no_first and (path / "text_encoder_2").is_dir())


def is_sdxl_folder(path: Path) -> bool:
    return "XL" in read_model_index(path).get("_class_name", "") or (Path(path) / "text_encoder_2").is_dir()


def check_model_folder(path: Path) -> None:
    """Raise a UserError naming the first missing file of a diffusers SD folder."""
    if not path.exists():
        raise UserError(f"model {path} does not exist; pass a local diffusers folder or .safetensors file")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path / 'model_index.json'} is missing; {path} is not a diffusers pipeline folder "
                        f"(save one with pipeline.save_pretrained, or pass a .safetensors checkpoint)")
    if is_refiner(read_model_index(path), path):
        raise UserError(f"{path} is an SDXL refiner (text_encoder_2 only, aesthetic-score conditioning), which "
                        f"t2i_fast does not train; pass the SDXL base model folder")
    sdxl = is_sdxl_folder(path)
    components = SDXL_COMPONENTS if sdxl else COMPONENTS
    for name in components:
        sub = path / name
        if not sub.is_dir():
            raise UserError(f"model folder {path} has no {name}/ folder; it must hold {', '.join(components)}")
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if sdxl else ()):
        cfg = path / name / "config.json"
        if not cfg.is_file():
            raise UserError(f"{cfg} is missing; the {name} of {path} cannot be loaded")
        suffixes = {f.suffix for f in (path / name).iterdir()}
        if ".safetensors" not in suffixes and ".bin" in suffixes:  # pickle, which can run code on load
            raise UserError(f"{path / name} holds only .bin weights and t2i_fast reads safetensors only; convert "
                            f"the model once with {'StableDiffusionXLPipeline' if sdxl else 'StableDiffusionPipeline'}"
                            f".from_pretrained(DIR).save_pretrained(NEW_DIR) and pass NEW_DIR")
        if ".safetensors" not in suffixes:
            raise UserError(f"{path / name} holds no weights (*.safetensors); the model folder is incomplete")


def load_components(model: str | os.PathLike, torch_dtype=None, weights: bool = True) -> Components:
    """Load the UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler of a local SD 1.x/2.x/SDXL model.
    weights=False builds the networks from their configs on the meta device, reading no weights (the
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
        second = _second_encoder(path, torch_dtype, weights) if is_sdxl_folder(path) else (None, None)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
    return _finish(unet, vae, text_encoder, tokenizer, scheduler, path, *second)


def _second_encoder(path: Path, torch_dtype=None, weights: bool = True):
    """SDXL's text_encoder_2 (CLIPTextModelWithProjection; on the meta device without weights) and tokenizer_2."""
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    if weights:
        kw = dict(local_files_only=True, use_safetensors=True)
        if torch_dtype is not None:
            kw["torch_dtype"] = torch_dtype
        encoder = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw)
    else:
        with torch.device("meta"):
            encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(path / "text_encoder_2"))
        if torch_dtype is not None:
            encoder = encoder.to(torch_dtype)
    return encoder, AutoTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)


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


def _finish(unet, vae, text_encoder, tokenizer, scheduler, path: Path, text_encoder_2=None,
            tokenizer_2=None) -> Components:
    family = detect_family(dict(unet.config), None)
    if family == "sdxl" and (text_encoder is None or text_encoder_2 is None):
        raise UserError(f"{path} is an SDXL model without both text encoders (a refiner?); t2i_fast trains SDXL "
                        f"base models, which have text_encoder and text_encoder_2")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"{path}: prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, family, prediction, path, text_encoder_2,
                      tokenizer_2)


def _load_single_file(path: Path, torch_dtype=None) -> Components:
    """Single-file checkpoints need a config that diffusers would fetch from the hub; offline it works only
    when that config is already in the local cache. Otherwise tell the user how to convert."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if peek_family(path) == "sdxl" else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(path), local_files_only=True, **pipeline_dtype(torch_dtype))
    except Exception as e:  # diffusers raises many types here; all mean "cannot do it offline"
        raise UserError(
            f"{path} cannot be loaded offline ({type(e).__name__}); convert it once to a diffusers folder on a "
            f"machine with its config (e.g. {cls.__name__}.from_single_file(...).save_pretrained(DIR)) "
            f"and pass DIR") from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    second = (getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))
    return _finish(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, path, *second)


def read_model_index(path: str | os.PathLike) -> dict:
    p = Path(path) / "model_index.json"
    return json.loads(p.read_text()) if p.is_file() else {}
