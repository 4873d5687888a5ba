"""Every adapter layout t2i_fast writes, read back into a diffusers pipeline through diffusers' own loaders
(load_textual_inversion, load_lora_weights), each checked against the pipeline first so that a file made
for another base model fails with a one-line error instead of a traceback.

    learned_embeds.safetensors            textual inversion; a LoRA run's trained token (--train-token);
                                          on SDXL {"clip_l", "clip_g"}, one half per text encoder
    init_embeds.safetensors               the frozen tokens a run was trained with (--init-embeddings)
    pytorch_lora_weights.safetensors      LoRA (diffusers layout)
    pytorch_custom_diffusion_weights...   Custom Diffusion processors (cd_files.py), with <token> files
    model_index.json + unet/ ...          a whole pipeline (dreambooth, two_stage with a full stage 2), SDXL's
                                          with text_encoder_2/ and tokenizer_2/

methods/base.MethodSpec.load reads them with load_layouts; a method with a layout of its own adds its
reader on its class.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .cd_files import CD_FILE, CD_SVD_FILE, install_processors, load_compressed, token_files
from .errors import UserError
from .lazy_imports import peft_without_bitsandbytes
from .formats import (INIT_FILE, LORA_FILE, TI_FILE, load_textual_inversion, load_textual_inversion_sdxl,
                      read_init_embeddings, read_safetensors)
from .notices import dropped

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


def load_sdxl_token_file(pipe, path: Path) -> str:
    """An SDXL embedding file ({"clip_l", "clip_g"}): each half through diffusers' load_textual_inversion into
    its text encoder and tokenizer, unless the first tokenizer holds the token already. Returns the token."""
    token, tensors = load_textual_inversion_sdxl(path)
    if token in pipe.tokenizer.get_vocab():
        return token
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        width = encoder.get_input_embeddings().embedding_dim
        if tensors[key].shape[-1] != width:
            raise UserError(f"{path}: {key} has {tensors[key].shape[-1]}-wide vectors but this model's text "
                            f"encoder's are {width}-wide; {OTHER_BASE}")
        pipe.load_textual_inversion(tensors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
    return token


def token_file_loader(pipe, path: Path):
    """(token, loader) of a token file, its layout checked against pipe's text encoders: an SDXL file
    {"clip_l", "clip_g"} for an SDXL pipeline (loader: load_sdxl_token_file), a {token: vectors} file for the
    others (load_token_file). loader(pipe, path) loads it."""
    sdxl = load_textual_inversion_sdxl(path)
    if (sdxl is not None) != (getattr(pipe, "text_encoder_2", None) is not None):
        raise UserError(f"{path} is {'an SDXL (clip_l, clip_g)' if sdxl else 'an SD 1.x/2.x'} token embedding; "
                        f"{OTHER_BASE}")
    if sdxl is not None:
        return sdxl[0], load_sdxl_token_file
    return load_textual_inversion(path)[0], load_token_file


def load_init_embeddings(pipe, path: Path) -> list[str]:
    """The frozen tokens a LoRA run was trained with (its copy of --init-embeddings), each through diffusers'
    load_textual_inversion, unless the tokenizer holds it already (an SDXL file into both text encoders).
    Returns [path.name] if any was loaded."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        read_init_embeddings(path, 2)  # an SD 1.x file is refused here in one line
        before = len(pipe.tokenizer)
        load_sdxl_token_file(pipe, path)
        return [path.name] if len(pipe.tokenizer) > before else []
    new = {t: v for t, v in read_init_embeddings(path)[0].items() if t not in pipe.tokenizer.get_vocab()}
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
        model = getattr(pipe, prefix, None) if prefix in ("unet", "text_encoder", "text_encoder_2") else None
        if model is None:
            continue
        found = layer_path(model, module_path)
        layer = model.get_submodule(found) if found is not None else None
        if layer is None or not hasattr(layer, "weight"):
            raise UserError(f"{path}: layer {prefix}.{module_path} does not exist in this model; {OTHER_BASE}")
        dim = 1 if end == ".lora_A.weight" else 0  # A reads the layer's input, B writes its output
        if tensor.dim() != 2 or tensor.shape[dim] != layer.weight.shape[dim]:
            raise UserError(f"{path}: {key} has shape {tuple(tensor.shape)}, which does not fit this model's layer "
                            f"of shape {tuple(layer.weight.shape)}; {OTHER_BASE}")
    return any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in tensors)


def layer_path(model, module_path: str) -> str | None:
    """The path under which `model` holds the layer a file names `module_path`, or None: transformers 5
    flattened CLIPTextModel (no text_model.), so a file may name a text-encoder layer either way."""
    paths = (module_path, module_path.removeprefix("text_model."), "text_model." + module_path)
    return next((p for p in paths if _has_submodule(model, p)), None)


def _has_submodule(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def load_lora_weights(pipe, folder: str | os.PathLike, weight_name: str = LORA_FILE) -> None:
    """pipe.load_lora_weights, checked first (check_lora), without diffusers' notice that a UNet-only file has no
    text-encoder keys (it says itself that this is safe to ignore, and every UNet LoRA would print it)."""
    has_text_encoder = check_lora(pipe, Path(folder) / weight_name)
    peft_without_bitsandbytes()
    quiet = dropped("diffusers.loaders.lora_base", "No LoRA keys associated to")
    with quiet if not has_text_encoder else contextlib.nullcontext():
        pipe.load_lora_weights(str(folder), weight_name=weight_name)


def fuse_loaded_loras(pipe) -> bool:
    """Fold the LoRA layers diffusers loaded (through peft) into the base weights and remove the layers, for a
    pipeline that only generates (`t2i-fast sample`, the sample grid, the toy evaluator): each layer then costs
    what the base layer does. On the toy model the evaluator's 40 images took 0.2-0.7 s less of ~3.5 s (one
    shared core, timed once, not a bench), but the whole default command's wall did not move beyond its noise
    (3 alternating runs per side); the images differ by at most 1/255 in 0.01% of the pixels. Float32
    pipelines only: in half precision the small update would round away in the folded weight. Whether it
    folded anything."""
    parts = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    if not any(getattr(m, "peft_config", None) for m in parts) or pipe.unet.dtype != torch.float32:
        return False
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the layers only: the folded weights stay
    return True


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
        _, load = token_file_loader(pipe, folder / name)
        load(pipe, folder / name)
        loaded.append(name)
    return loaded


def load_pipeline_parts(pipe, folder: Path) -> list[str]:
    """Swap the UNet, text encoder(s) and tokenizer(s) of a saved pipeline folder (a dreambooth run, two_stage
    with a full stage 2) into `pipe`, in its dtype and on its device. Returns the parts loaded."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = (folder / "text_encoder_2").is_dir()
    if sdxl and getattr(pipe, "text_encoder_2", None) is None:
        raise UserError(f"{folder} is an SDXL pipeline (it has text_encoder_2); {OTHER_BASE}")
    dtype, device = pipe.unet.dtype, pipe.unet.device
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                          local_files_only=True, use_safetensors=True).to(device)}
    if (folder / "text_encoder").is_dir():
        parts["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype,
                                                              local_files_only=True, use_safetensors=True).to(device)
    if (folder / "tokenizer").is_dir():
        parts["tokenizer"] = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    if sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", torch_dtype=dtype, local_files_only=True, use_safetensors=True).to(device)
    if (folder / "tokenizer_2").is_dir() and getattr(pipe, "tokenizer_2", None) is not None:
        parts["tokenizer_2"] = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    pipe.register_modules(**parts)
    return list(parts)


def load_layouts(pipe, folder: Path, names: list[str]) -> list[str]:
    """Load every adapter file among `names` (files in `folder`) into `pipe`: a saved pipeline's parts first,
    then token files, then LoRA and Custom Diffusion weights. Returns the names (parts) loaded."""
    loaded = []
    pipeline = "model_index.json" in names and (folder / "unet").is_dir()
    if pipeline:
        loaded += load_pipeline_parts(pipe, folder)
    if TI_FILE in names:
        token, load = token_file_loader(pipe, folder / TI_FILE)
        if not (pipeline and token in pipe.tokenizer.get_vocab()):  # the saved tokenizer may hold it already
            load(pipe, folder / TI_FILE)
            loaded.append(TI_FILE)
    if INIT_FILE in names:
        loaded += load_init_embeddings(pipe, folder / INIT_FILE)
    if LORA_FILE in names:
        load_lora_weights(pipe, folder)
        loaded.append(LORA_FILE)
    loaded += load_custom_diffusion(pipe, folder, names)  # its processors and <token>.safetensors files
    return loaded
