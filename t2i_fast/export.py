"""`t2i-fast export RUN --format kohya|a1111`: a finished run's adapter in the layouts other tools read.

- kohya: the LoRA in kohya-ss naming, which A1111, ComfyUI and diffusers' load_lora_weights read:
  `lora_unet_<module path, dots as underscores>.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and
  `.alpha` (a scalar), text encoder `lora_te_<path>`. Our files fold the scale alpha/rank into lora_B (up),
  so alpha is written as the rank: scale 1 in every reader. An SDXL LoRA is named as kohya-ss writes SDXL
  LoRAs: the UNet by the original SDXL checkpoint's module paths (`lora_unet_input_blocks_4_1_...`, see
  sgm_unet_path), the text encoders `lora_te1_` and `lora_te2_`.
- a1111: a textual-inversion embedding {"emb_params": (n, dim)} in a .safetensors file, as kohya's
  sd-scripts write it; A1111 and ComfyUI name the embedding after the file, so the file is named after the
  token (<sks> -> sks.safetensors). diffusers' load_textual_inversion reads it too (with token=...). An SDXL
  embedding keeps its two halves {"clip_l", "clip_g"}, the SDXL embedding layout of A1111 and ComfyUI.

A method without such a file (dreambooth saves a whole pipeline; custom_diffusion its own processors) is
refused with a UserError, as is a run folder that did not finish or lacks a file. Nothing is written
until every check has passed, and the file is written under a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .errors import UserError
from .formats import (LORA_FILE, TI_FILE, atomic_save, load_lora, load_textual_inversion, load_textual_inversion_sdxl,
                      read_safetensors)
from .methods import get_method
from .run_folder import read_report

FORMATS = {"kohya": (LORA_FILE, "LoRA"), "a1111": (TI_FILE, "textual-inversion embedding")}
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIX_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"


def source_file(run: Path, fmt: str) -> tuple[Path, dict | None]:
    """The file `fmt` is made from (in a run folder, or `run` itself when it is an adapter file)."""
    name, what = FORMATS[fmt]
    if run.is_file():  # a single adapter file: its kind is in its metadata
        _, meta = read_safetensors(run)
        kind = meta.get("t2i_fast.kind")
        wanted = "lora" if fmt == "kohya" else "textual_inversion"
        if kind is not None and kind != wanted:
            raise UserError(f"{run} holds a {kind} adapter, not a {what}; --format {fmt} needs {name}")
        return run, None
    method, report = read_report(run)
    spec = get_method(method)  # which formats a method's runs can have is declared on its class
    if fmt not in spec.export_formats:
        available = [f for f in FORMATS if f in spec.export_formats]
        hint = f"; use --format {available[0]}" if available else ""
        raise UserError(f"method {method} has no {fmt} format: it saves {spec.saves}{hint}")
    path = run / name
    if not path.is_file():
        if name in report.get("files", []):
            raise UserError(f"{path} is missing: the run folder is incomplete; copy the file back or train again")
        raise UserError(f"run {run} (method {method}) has no {what} ({name}), so there is nothing for "
                        f"--format {fmt}{spec.export_hints.get(fmt, '')}")
    return path, report


ATTENTION_PATH = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def sgm_unet_path(path: str, layers_per_block: int) -> str:
    """An SDXL UNet attention module's diffusers path -> its path in the original (SGM) SDXL checkpoint, by which
    kohya's sd-scripts name SDXL LoRAs (and A1111 and ComfyUI read them): down_blocks.b.attentions.l ->
    input_blocks.(1 + b(L+1) + l).1, mid_block.attentions.0 -> middle_block.1, up_blocks.b.attentions.l ->
    output_blocks.(b(L+1) + l).1, L = layers per block (input_blocks.0 is conv_in, every down block ends in
    a downsampler, every up block has L+1 layers). The inverse of diffusers' _maybe_map_sgm_blocks_to_diffusers."""
    if path.startswith("mid_block.attentions.0."):
        return "middle_block.1." + path[len("mid_block.attentions.0."):]
    m = ATTENTION_PATH.match(path)
    if m is None:
        raise UserError(f"UNet layer {path} is not in an attention block; the SDXL kohya layout names those only")
    block, layer = int(m[2]), int(m[3])
    if m[1] == "down_blocks":
        return f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1.{m[4]}"
    return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{m[4]}"


def layers_per_block(path: Path, unet_paths) -> int:
    """The UNet's layers per block, read off a LoRA on all its attention layers: a down block holds L attention
    layers, an up block L + 1."""
    found = {kind: 1 + max((int(m[3]) for m in map(ATTENTION_PATH.match, unet_paths) if m and m[1] == kind),
                           default=-1) for kind in ("down_blocks", "up_blocks")}
    if found["up_blocks"] != found["down_blocks"] + 1:
        raise UserError(f"{path}: its UNet LoRA does not cover every attention layer, so its SDXL block numbers "
                        f"cannot be told; export a run of t2i-fast's --method lora")
    return found["down_blocks"]


def to_kohya(path: Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """Our diffusers-layout LoRA file -> kohya tensors (alpha = rank) and the number of modules."""
    layers = load_lora(path)
    sdxl = "text_encoder_2" in layers or read_safetensors(path)[1].get("t2i_fast.family") == '"sdxl"'
    names = KOHYA_PREFIX_SDXL if sdxl else KOHYA_PREFIX
    per_block = layers_per_block(path, layers["unet"]) if sdxl and "unet" in layers else None
    tensors = {}
    for prefix, group in layers.items():
        if prefix not in names:
            raise UserError(f"{path}: LoRA on {prefix!r} has no name in the kohya layout ({', '.join(names)} only)")
        for module_path, (a, b) in group.items():
            if prefix == "unet" and sdxl:
                module_path = sgm_unet_path(module_path, per_block)
            if prefix != "unet" and not module_path.startswith("text_model."):
                # transformers 5 flattened CLIPTextModel; kohya names (and A1111/ComfyUI) keep text_model_
                module_path = "text_model." + module_path
            name = names[prefix] + module_path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = a.to(dtype)
            tensors[f"{name}.lora_up.weight"] = b.to(dtype)  # already scaled by alpha/rank
            tensors[f"{name}.alpha"] = torch.tensor(float(a.shape[0]), dtype=dtype)
    return tensors, sum(len(g) for g in layers.values())


def export(run: str | Path, fmt: str, out: str | Path | None = None, dtype: str = "fp32") -> Path:
    """Write the run's adapter in layout `fmt` ("kohya" or "a1111"); return the file written.

    out: a .safetensors path, or a folder (default RUN/export) that receives <token>.safetensors (a1111) or
    <token>_lora.safetensors (kohya)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run = Path(run).expanduser()
    if not run.exists():
        raise UserError(f"run folder {run} does not exist; pass the --out folder of a finished training")
    path, report = source_file(run, fmt)
    config = (report or {}).get("config") or {}
    token = config.get("token", "embedding")
    meta = {"format": "pt", "t2i_fast.source": str(path)}
    if report is not None:
        meta["t2i_fast.config"] = json.dumps(config)
    if fmt == "kohya":
        tensors, modules = to_kohya(path, DTYPES[dtype])
        rank = int(next(iter(tensors.values())).shape[0])
        name = f"{_stem(token)}_lora.safetensors"
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                     "ss_network_alpha": str(rank), "t2i_fast.kind": "lora_kohya"})
    else:
        sdxl = load_textual_inversion_sdxl(path)
        if sdxl is not None:  # SDXL: both halves, as A1111 and ComfyUI read SDXL embeddings
            token, halves = sdxl
            tensors = {key: v.to(DTYPES[dtype]) for key, v in halves.items()}
        else:
            token, vectors = load_textual_inversion(path)
            tensors = {"emb_params": vectors.reshape(-1, vectors.shape[-1]).to(DTYPES[dtype])}
        name = f"{_stem(token)}.safetensors"
        meta.update({"name": _stem(token), "token": token, "t2i_fast.kind": "textual_inversion_a1111"})
        if report is not None and "steps" in report:
            meta["step"] = str(report["steps"])
    default_dir = (run.parent if run.is_file() else run) / "export"
    target = Path(out).expanduser() if out is not None else default_dir
    if target.suffix != ".safetensors":
        target = target / name
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, target, meta)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2i-fast export", description="Write a finished run's adapter in the kohya LoRA layout (A1111, "
        "ComfyUI, diffusers read it) or as an A1111 textual-inversion embedding.")
    parser.add_argument("run", help="a finished training output folder (or one of its .safetensors files)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), dest="fmt",
                        help="kohya: LoRA as lora_unet_*/lora_te_* keys; a1111: embedding as emb_params")
    parser.add_argument("--out", default=None, help="output .safetensors file or folder [default: RUN/export]")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="tensor dtype [default: fp32]")
    args = parser.parse_args(argv)
    path = export(args.run, args.fmt, args.out, args.dtype)
    use = ("<lora:%s:1> in A1111, a LoraLoader node in ComfyUI" % path.stem if args.fmt == "kohya"
           else f"put it in A1111's embeddings/ and write '{path.stem}' in prompts")
    print(f"wrote {path} ({use})")
    return 0

