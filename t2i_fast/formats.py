"""Adapter files in the layouts diffusers loads (safetensors only; no pickle).

- LoRA: `pytorch_lora_weights.safetensors`, peft-style keys `unet.<module path>.lora_A.weight` (r, in) and
  `.lora_B.weight` (out, r), `text_encoder.` likewise, for `StableDiffusionPipeline.load_lora_weights`. The
  scale alpha/rank is folded into lora_B, so the file needs no alpha and loads at scale 1 anywhere.
- Textual inversion: `learned_embeds.safetensors` {token: (n, dim)}, for `load_textual_inversion`. On SDXL it
  holds {"clip_l": (n, D1), "clip_g": (n, D2)}, one embedding per text encoder (the layout A1111 and ComfyUI
  read), with the token in the metadata; diffusers loads each half into its encoder (adapter_files.py).
Every file carries the training config as JSON in its safetensors metadata. Files are written to a
temporary name and renamed, so a crash never leaves half a file behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
# a LoRA run trained on frozen tokens (--init-embeddings) keeps a copy of their file, so the run loads alone
INIT_FILE = "init_embeds.safetensors"
# what a full-UNet run (dreambooth; two_stage with --stage2-unet full) writes: a diffusers pipeline folder
PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")
SDXL_PIPELINE_PARTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL pipeline folder holds besides


def adapter_metadata(cfg, kind: str, extra: dict | None = None) -> dict[str, str]:
    """The safetensors metadata of every adapter file we write: its kind, the config that made it, and
    `extra` (each value JSON-encoded under t2i_fast.<key>)."""
    meta = {"format": "pt", "t2i_fast.kind": kind}
    if cfg is not None:
        meta["t2i_fast.config"] = json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    for k, v in (extra or {}).items():
        meta[f"t2i_fast.{k}"] = json.dumps(v)
    return meta


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors save_file to path.tmp, then rename over path."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    shareable(tmp)
    os.replace(tmp, path)


def shareable(path: Path) -> None:
    """Give the file (or every file under the folder) the usual mode, 0666 less the umask: safetensors writes
    its files 0600, which other users (an A1111 or ComfyUI server) cannot read."""
    path = Path(path)
    mask = os.umask(0)
    os.umask(mask)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, 0o666 & ~mask)


def read_adapter(path: Path, kind: str, required: str | None = None,
                 fix: str = "train it again") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata (t2i_fast.<key>: its JSON value) of a file adapter_metadata marked `kind`;
    a one-line UserError, ending in `fix`, for a file of another kind or one without the tensor `required`."""
    tensors, meta = read_safetensors(path)
    found = meta.get("t2i_fast.kind")
    if found != kind or (required is not None and required not in tensors):
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(f"{path} is not {article} {kind} file (kind {found!r}); {fix}")
    info = {k[len("t2i_fast."):]: json.loads(v) for k, v in meta.items()
            if k.startswith("t2i_fast.") and k != "t2i_fast.kind"}
    return tensors, info


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file; only safetensors are loaded (no pickle)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-export it") from None
    check_finite(tensors, path)
    return tensors, meta


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A UserError naming the file when a tensor holds NaN or inf: a diverged training wrote it, and every
    image made with it would be noise."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path} holds NaN or infinite values ({key}): the training that wrote it diverged; "
                            f"train it again with a lower --lr")


def save_lora(path: Path, layers: dict[str, dict], cfg=None, family: str | None = None) -> None:
    """layers: {"unet": {module_path: LoRALinear}, "text_encoder": {...}} (SDXL: "text_encoder_2" too) ->
    diffusers LoRA file. family "sdxl" is written into the metadata (the kohya export names the text encoders
    te1/te2 for it); other families write none, as before."""
    tensors = {}
    ranks = set()
    for prefix, group in layers.items():
        for module_path, layer in group.items():
            tensors[f"{prefix}.{module_path}.lora_A.weight"] = layer.lora_A.float()
            tensors[f"{prefix}.{module_path}.lora_B.weight"] = layer.lora_B.float() * layer.scale
            ranks.add(layer.rank)
    extra = {"rank": sorted(ranks)}
    if family == "sdxl":
        extra["family"] = family
    atomic_save(tensors, path, adapter_metadata(cfg, "lora", extra))


def load_lora(path: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Our reader of a diffusers-layout LoRA file: {"unet": {module_path: (A, B_scaled)}, ...}."""
    tensors, _ = read_safetensors(path)
    out: dict[str, dict] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix, _, module_path = key[: -len(".lora_A.weight")].partition(".")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise UserError(f"{path}: {key} has no matching lora_B; the file is incomplete")
        out.setdefault(prefix, {})[module_path] = (a, tensors[b_key])
    if not out:
        raise UserError(f"{path} holds no LoRA weights (keys ending in .lora_A.weight)")
    return out


def save_textual_inversion(path: Path, token: str, vectors: torch.Tensor, cfg=None) -> None:
    """{token: (n, dim)} as `load_textual_inversion` expects (n > 1: token, token_1, ... on load)."""
    atomic_save({token: vectors.detach().float().reshape(-1, vectors.shape[-1])}, path,
                adapter_metadata(cfg, "textual_inversion"))


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG)


def save_textual_inversion_sdxl(path: Path, token: str, vectors: torch.Tensor, vectors_2: torch.Tensor,
                                cfg=None) -> None:
    """SDXL: {"clip_l": (n, D1), "clip_g": (n, D2)}, the token in the metadata (t2i_fast.token)."""
    tensors = {key: v.detach().float().reshape(-1, v.shape[-1])
               for key, v in zip(SDXL_EMBEDDING_KEYS, (vectors, vectors_2))}
    atomic_save(tensors, path, adapter_metadata(cfg, "textual_inversion", {"token": token}))


def save_token_embedding(path: Path, token: str, vectors: list[torch.Tensor], cfg=None) -> None:
    """A token's vectors, one tensor per text encoder: the {token: vectors} file for one encoder, the SDXL
    {"clip_l", "clip_g"} file for two."""
    if len(vectors) == 2:
        save_textual_inversion_sdxl(path, token, *vectors, cfg)
    else:
        save_textual_inversion(path, token, *vectors, cfg)


def load_textual_inversion_sdxl(path: Path) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(token, {"clip_l": (n, D1), "clip_g": (n, D2)}) of an SDXL embedding file we wrote; None for a file of
    another layout."""
    return _sdxl_embedding(*read_safetensors(path), path)


def _sdxl_embedding(tensors: dict[str, torch.Tensor], meta: dict, path: Path):
    """load_textual_inversion_sdxl of a file already read."""
    if sorted(tensors) != sorted(SDXL_EMBEDDING_KEYS):
        return None
    if "t2i_fast.token" not in meta:
        raise UserError(f"{path} is an SDXL embedding without its token in the metadata; load it with "
                        f"pipe.load_textual_inversion(..., token=TOKEN) for each of clip_l and clip_g")
    return json.loads(meta["t2i_fast.token"]), tensors


def load_textual_inversion(path: Path) -> tuple[str, torch.Tensor]:
    tensors, _ = read_safetensors(path)
    if len(tensors) != 1:
        raise UserError(f"{path} holds {len(tensors)} tensors; a textual-inversion file holds one {{token: vectors}}")
    (token, vectors), = tensors.items()
    return token, vectors


def read_config(path: Path) -> dict | None:
    """The training config stored in a file's metadata, or None."""
    _, meta = read_safetensors(path)
    raw = meta.get("t2i_fast.config")
    return json.loads(raw) if raw else None


def read_init_embeddings(path: str | Path, encoders: int = 1) -> list[dict[str, torch.Tensor]]:
    """One {token: (n, dim)} per text encoder from the learned_embeds.safetensors of a textual-inversion run
    (--init-embeddings): an SD 1.x/2.x {token: vectors} file for a model with one text encoder, an SDXL
    {"clip_l", "clip_g"} file for SDXL's two."""
    sets = _embedding_sets(path)
    if len(sets) != encoders:
        found, wanted = ("an SDXL (clip_l, clip_g)", "SD 1.x/2.x") if len(sets) == 2 else ("an SD 1.x/2.x", "SDXL")
        raise UserError(f"--init-embeddings {Path(path).expanduser()} is {found} embedding but the model is "
                        f"{wanted}; pass the learned_embeds.safetensors of a textual-inversion run on this model")
    return sets


def init_tokens(path: str | Path) -> dict[str, int]:
    """{token: number of vectors} of an --init-embeddings file of either layout."""
    return {token: len(v) for token, v in _embedding_sets(path)[0].items()}


def _embedding_sets(path: str | Path) -> list[dict[str, torch.Tensor]]:
    """{token: (n, dim)} per text encoder that an --init-embeddings file is for (one, or SDXL's two)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--init-embeddings {path} does not exist; pass the learned_embeds.safetensors of a "
                        f"textual-inversion run")
    tensors, meta = read_safetensors(path)
    sdxl = _sdxl_embedding(tensors, meta, path)
    if sdxl is not None:
        token, halves = sdxl
        return [{token: halves[key]} for key in SDXL_EMBEDDING_KEYS]
    return [{token: v.reshape(-1, v.shape[-1]) for token, v in tensors.items()}]
