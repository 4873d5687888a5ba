"""Many adapters in one batch: sample i of a batch denoised with adapter a[i], one UNet pass per step.

Design. N adapter folders (LoRA and/or Custom Diffusion runs written by this package) are read once and
stacked onto ONE base pipeline; every linear layer any of them touches is replaced by a RoutedLinear that
reads the batch's per-sample adapter index from a shared Route:

- LoRA: the adapters' A (E+1, r_max, in) and B (E+1, out, r_max) stacked, ranks zero-padded, the scale
  already in B (formats.save_lora folds alpha/rank in), the last row zero; y = x Wᵀ + B[a] A[a] x by two
  bmm's on the gathered stack. Twin (use_kernels(False)): a loop over the samples.
- Custom Diffusion: its file holds the full to_k/to_v weights W_cd; we keep Δ = W_cd - W0 (E+1, out, in),
  zero for adapters without one, and run the kv_delta op with its per-sample index (its own twin applies).
- The text side (tokens, text-encoder LoRA) differs per adapter and token names collide (every user has
  a `<sks>`): each adapter's prompts are encoded by its own copy of the tokenizer(s) and text encoder(s), once
  per generation, and the embeddings are handed to diffusers' pipeline as prompt_embeds (and SDXL's pooled
  embeddings as pooled_prompt_embeds; its time ids are the same for every sample of a batch).

The denoising loop is diffusers' own StableDiffusion(XL)Pipeline.__call__ (same scheduler, same latents from the
same per-sample generators, same guidance), so sample i equals a single-adapter run of build_pipeline +
generate up to float rounding; we only set the Route's index around the call. Classifier-free guidance runs
the UNet on [uncond; cond], so the index is repeated for the two halves.

Limits: Custom Diffusion runs that also trained to_q/to_out (--train-q-out) and whole-pipeline runs
(dreambooth) are refused: their weights are not low-rank or K/V deltas.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import adapter_files
from .cd_files import CD_FILE, CD_SVD_FILE, check_fits, cross_attention_modules, load_compressed, token_files
from .errors import UserError
from .formats import INIT_FILE, LORA_FILE, TI_FILE, load_lora, read_safetensors
from .kernels import kv_delta
from .kernels._dispatch import kernels_enabled
from .run_folder import method_of, refuse_non_finite

# the methods whose files are low-rank updates, K/V deltas and tokens; None: a folder without a report (a
# merge, files written by hand or by diffusers' scripts), read by its files
MIXABLE = {"lora", "custom_diffusion", "textual_inversion", None}


class Route:
    """The per-sample adapter index every RoutedLinear reads: `index` (B,) long, or None outside a
    generation (then the layers act as the base model)."""

    def __init__(self):
        self.index: torch.Tensor | None = None


def lora_gathered(x, lora_a, lora_b, rows):
    """B[rows] A[rows] x per sample by two bmm's. x (B, ..., in), lora_a (E, r, in), lora_b (E, out, r),
    rows (B,) long -> (B, ..., out)."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])                                  # (B, T, in)
    low = torch.bmm(x3, lora_a.index_select(0, rows).transpose(1, 2))            # (B, T, r)
    out = torch.bmm(low, lora_b.index_select(0, rows).transpose(1, 2))           # (B, T, out)
    return out.reshape(*x.shape[:-1], lora_b.shape[1])


def lora_gathered_ref(x, lora_a, lora_b, rows):
    """Plain twin: one sample at a time."""
    return torch.stack([F.linear(F.linear(x[i], lora_a[r]), lora_b[r]) for i, r in enumerate(rows.tolist())])


class RoutedLinear(nn.Module):
    """A base nn.Linear plus per-adapter LoRA and/or K/V deltas, chosen per sample by route.index.

    `rows` maps an adapter id (0..N-1, N = base) to its row in the stacks; the last row of each stack is zero."""

    def __init__(self, base: nn.Linear, route: Route, lora_a=None, lora_b=None, lora_rows=None, delta=None,
                 delta_rows=None):
        super().__init__()
        self.base, self.route = base, route
        self.register_buffer("lora_a", lora_a)
        self.register_buffer("lora_b", lora_b)
        self.register_buffer("lora_rows", lora_rows)
        self.register_buffer("delta", delta)
        self.register_buffer("delta_rows", delta_rows)

    def forward(self, x):
        index = self.route.index
        if index is None:
            return self.base(x)
        if index.numel() != x.shape[0]:
            raise RuntimeError(f"adapter index has {index.numel()} entries for a batch of {x.shape[0]}")
        rows = self.delta_rows[index] if self.delta is not None else None
        if rows is not None and bool((rows != self.delta.shape[0] - 1).any()):  # some sample has a K/V delta
            y = kv_delta(x, self.base.weight, self.delta, rows)
            y = y + self.base.bias if self.base.bias is not None else y
        else:
            y = self.base(x)
        if self.lora_a is not None:
            rows = self.lora_rows[index]
            y = y + (lora_gathered if kernels_enabled() else lora_gathered_ref)(x, self.lora_a, self.lora_b, rows)
        return y


@dataclass
class Adapter:
    """What one folder brings: UNet LoRA {module path: (A, B_scaled)}, K/V deltas {module path: Δ},
    text-encoder LoRA, and the token files its prompts need."""
    path: Path
    unet_lora: dict = field(default_factory=dict)
    deltas: dict = field(default_factory=dict)
    text_lora: dict = field(default_factory=dict)
    text_lora_2: dict = field(default_factory=dict)  # SDXL's second text encoder
    token_files: list = field(default_factory=list)  # (kind, Path): "ti" or "init"

    @property
    def has_text_side(self) -> bool:
        return bool(self.text_lora or self.text_lora_2 or self.token_files)


def read_adapter(pipe, adapter: str | os.PathLike) -> Adapter:
    """Read one LoRA / Custom Diffusion run folder, checked against pipe; a UserError for anything else."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise UserError(f"adapter {path} is not a folder; pass a LoRA or Custom Diffusion training output folder")
    names = sorted(os.listdir(path))
    refuse_non_finite(path, names)
    method = method_of(path)
    if "model_index.json" in names or method not in MIXABLE:
        raise UserError(f"adapter {path} was made by {method or 'a whole-pipeline run'}, whose weights cannot "
                        f"share a batch with other adapters (only {', '.join(sorted(MIXABLE - {None}))} runs can): "
                        f"sample it alone (t2i-fast sample --adapter {path})")
    out = Adapter(path)
    if TI_FILE in names:
        out.token_files.append(("ti", path / TI_FILE))
    if INIT_FILE in names:
        out.token_files.append(("init", path / INIT_FILE))
    if LORA_FILE in names:
        adapter_files.check_lora(pipe, path / LORA_FILE)  # shapes against this base, one-line errors
        tensors, _ = read_safetensors(path / LORA_FILE)
        if any(k.endswith(".alpha") for k in tensors):
            raise UserError(f"{path / LORA_FILE} has alpha keys (another trainer's layout), which a mixed batch "
                            f"does not scale; pass a run written by t2i-fast train --method lora")
        lora = load_lora(path / LORA_FILE)
        out.unet_lora, out.text_lora = lora.get("unet", {}), lora.get("text_encoder", {})
        out.text_lora_2 = lora.get("text_encoder_2", {})
    if CD_FILE in names or CD_SVD_FILE in names:
        out.deltas = read_kv_deltas(pipe.unet, path, CD_FILE if CD_FILE in names else CD_SVD_FILE)
        out.token_files += [("ti", path / n) for n in token_files(path, names)]
    if not (out.unet_lora or out.deltas or out.has_text_side):
        raise UserError(f"{path} holds no LoRA or Custom Diffusion file ({LORA_FILE}, {CD_FILE}); pass a finished "
                        f"lora or custom_diffusion run folder")
    return out


def read_kv_deltas(unet: nn.Module, folder: Path, name: str) -> dict[str, torch.Tensor]:
    """{module path of to_k / to_v: W_cd - W0} from a Custom Diffusion weights file (full weights, or the
    SVD-compressed deltas rebuilt on this UNet). The difference is taken in float64 so W0 + Δ rounds to W_cd."""
    source = folder / name
    state = read_safetensors(source)[0] if name == CD_FILE else load_compressed(source, unet)
    groups = check_fits(unet, state, source)
    modules = cross_attention_modules(unet)
    deltas = {}
    for key, sub in groups.items():
        if any(k.startswith(("to_q_", "to_out_")) for k in sub):
            raise UserError(f"{source} also trained to_q/to_out (--train-q-out); only K/V deltas can share a "
                            f"batch: sample this adapter alone")
        attn, prefix = modules[key], key[: -len(".processor")]
        for proj in ("to_k", "to_v"):
            w0 = getattr(attn, proj).weight.detach()
            w = sub[f"{proj}_custom_diffusion.weight"].to(w0.device)
            deltas[f"{prefix}.{proj}"] = (w.double() - w0.double()).to(w0.dtype)
    return deltas


def _stack_lora(pairs: list, n: int, like: nn.Linear):
    """[(adapter id, A, B)] -> lora_a (E+1, r_max, in), lora_b (E+1, out, r_max), rows (n+1,)."""
    r_max = max(a.shape[0] for _, a, _ in pairs)
    w = like.weight
    stack_a = w.new_zeros(len(pairs) + 1, r_max, w.shape[1])
    stack_b = w.new_zeros(len(pairs) + 1, w.shape[0], r_max)
    rows = torch.full((n + 1,), len(pairs), dtype=torch.long, device=w.device)
    for row, (aid, a, b) in enumerate(pairs):
        stack_a[row, : a.shape[0]] = a.to(w)
        stack_b[row, :, : b.shape[1]] = b.to(w)
        rows[aid] = row
    return stack_a, stack_b, rows


def _stack_deltas(pairs: list, n: int, like: nn.Linear):
    w = like.weight
    stack = w.new_zeros(len(pairs) + 1, *w.shape)
    rows = torch.full((n + 1,), len(pairs), dtype=torch.long, device=w.device)
    for row, (aid, d) in enumerate(pairs):
        stack[row] = d.to(w)
        rows[aid] = row
    return stack, rows


def resolve(model: nn.Module, module_path: str) -> str:
    """The module path as `model` names it (adapter_files.layer_path), checked to be a linear layer."""
    found = adapter_files.layer_path(model, module_path)
    if found is not None and isinstance(model.get_submodule(found), nn.Linear):
        return found
    raise UserError(f"layer {module_path} is not a linear layer of this model; the adapter was made for another "
                    f"base model")


def route_layers(model: nn.Module, route: Route, loras: list[dict], deltas: list[dict] = ()) -> int:
    """Replace every nn.Linear of `model` that some adapter touches by a RoutedLinear. loras[i] / deltas[i]:
    adapter i's {module path: (A, B)} / {module path: Δ}. Returns the number of layers routed."""
    n = len(loras)
    per_layer: dict[str, dict] = {}
    for aid, layers in enumerate(loras):
        for p, (a, b) in layers.items():
            per_layer.setdefault(resolve(model, p), {"lora": [], "delta": []})["lora"].append((aid, a, b))
    for aid, layers in enumerate(deltas):
        for p, d in layers.items():
            per_layer.setdefault(resolve(model, p), {"lora": [], "delta": []})["delta"].append((aid, d))
    for p, parts in per_layer.items():
        base = model.get_submodule(p)
        kw = {}
        if parts["lora"]:
            kw.update(zip(("lora_a", "lora_b", "lora_rows"), _stack_lora(parts["lora"], n, base)))
        if parts["delta"]:
            kw.update(zip(("delta", "delta_rows"), _stack_deltas(parts["delta"], n, base)))
        model.set_submodule(p, RoutedLinear(base, route, **kw))
    return len(per_layer)


class MultiAdapter:
    """N adapters on one base StableDiffusionPipeline or StableDiffusionXLPipeline `pipe` (it is changed in
    place: its UNet's touched linears become RoutedLinear, which act as the base model outside generate)."""

    def __init__(self, pipe, adapters: list[str | os.PathLike]):
        if not adapters:
            raise UserError("no adapters given; pass at least one LoRA or Custom Diffusion run folder")
        self.pipe, self.route = pipe, Route()
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self._text = {}  # adapter id -> (pipeline, route) of its text side, built on first use (text_pipeline)
        self.adapters = [read_adapter(pipe, a) for a in adapters]
        route_layers(pipe.unet, self.route, [a.unet_lora for a in self.adapters], [a.deltas for a in self.adapters])

    def _index(self, adapters, n: int) -> list[int]:
        """Adapter ids with None/-1 (base model) as N; a UserError for anything else."""
        if len(adapters) != n:
            raise UserError(f"{len(adapters)} adapter indices for {n} prompts; pass one index per prompt")
        out = []
        for a in adapters:
            if a is None or (isinstance(a, int) and not isinstance(a, bool) and a == -1):
                out.append(len(self.adapters))
            elif isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(self.adapters):
                out.append(a)
            else:
                raise UserError(f"adapter index {a!r} is out of range: {len(self.adapters)} adapters are loaded "
                                f"(0..{len(self.adapters) - 1}); use -1 or None for the base model")
        return out

    def text_pipeline(self, aid: int):
        """(pipeline, route): a pipeline whose tokenizer and text encoder are private copies carrying adapter
        `aid`'s tokens (through diffusers' load_textual_inversion) and text-encoder LoRA (routed layers, `route`,
        None without); the base pipe if the adapter has no text side. Copies, not loads and unloads on the base:
        two adapters' `<sks>` never meet."""
        if aid == len(self.adapters) or not self.adapters[aid].has_text_side:
            return self.pipe, None
        if aid not in self._text:
            self._text[aid] = self._text_pipeline(aid)
        return self._text[aid]

    def _text_pipeline(self, aid: int):
        base, adapter = self.pipe, self.adapters[aid]
        # the copy shares every frozen weight with the base but the token embeddings, which the adapter's tokens
        # grow: an adapter costs its embedding tables (152 MB fp32 on SD 1.5), not a text encoder
        parts = {}
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(base, name, None)
            if encoder is not None:
                embedding = encoder.get_input_embeddings().weight
                parts[name] = copy.deepcopy(encoder, memo={id(p): p for p in encoder.parameters() if p is not embedding})
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(base, name, None) is not None:
                parts[name] = copy.deepcopy(getattr(base, name))
        settings = ({"force_zeros_for_empty_prompt": base.config.force_zeros_for_empty_prompt} if self.sdxl
                    else {"requires_safety_checker": False})  # as the base encodes an empty negative prompt
        text = type(base)(**{**base.components, **parts, **settings})
        for kind, path in adapter.token_files:
            if kind == "init":
                adapter_files.load_init_embeddings(text, path)
            else:
                _, load = adapter_files.token_file_loader(text, path)  # SD 1.x/2.x or SDXL (clip_l, clip_g)
                load(text, path)
        route = None
        if adapter.text_lora or adapter.text_lora_2:  # one adapter on a private copy: its index is always 0
            route = Route()
            for encoder, lora in ((text.text_encoder, adapter.text_lora),
                                  (getattr(text, "text_encoder_2", None), adapter.text_lora_2)):
                if lora:
                    route_layers(encoder, route, [lora])
        return text, route

    def encode(self, prompts: list[str], ids: list[int], cfg: bool, negative_prompt: str | None) -> dict:
        """The pipeline's embedding arguments (prompt_embeds, negative_prompt_embeds, and SDXL's pooled ones) in
        sample order, each sample encoded with its own adapter's text side; a loop over the distinct adapters
        (once per generation)."""
        device = self.pipe._execution_device
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if self.sdxl:
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        rows: dict[str, list] = {name: [None] * len(prompts) for name in names}
        for aid in sorted(set(ids)):
            group = [i for i, a in enumerate(ids) if a == aid]
            text, route = self.text_pipeline(aid)
            if route is not None:
                route.index = torch.zeros(len(group), dtype=torch.long, device=device)
            negatives = [negative_prompt] * len(group) if negative_prompt is not None else None
            encoded = text.encode_prompt(prompt=[prompts[i] for i in group], device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=cfg, negative_prompt=negatives)
            for name, tensor in zip(names, encoded):  # SDXL: (pe, ne, pooled, negative pooled)
                for j, i in enumerate(group):
                    rows[name][i] = tensor[j] if tensor is not None else None
        return {name: torch.stack(r) if r[0] is not None else None for name, r in rows.items()}

    @torch.no_grad()
    def generate(self, prompts: str | list[str], adapters: list, seeds: list[int] | None = None, steps: int = 30,
                 guidance: float = 7.5, resolution: int | None = None, negative_prompt: str | None = None,
                 output_type: str = "pil", batch: int | None = None):
        """Images (PIL, or a (B, H, W, 3) float array with output_type="np"): image i is prompts[i] (one
        prompt: the same for all) with adapter adapters[i] (-1/None: the base model), its initial latents drawn
        from torch.Generator("cpu").manual_seed(seeds[i]) (default seed i). One UNet pass per step for all, or
        for each `batch` images in turn where the whole batch would not fit in memory (the images are the
        same either way: each has its own generator)."""
        n = len(adapters)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        ids = self._index(adapters, len(prompts))
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise UserError(f"{len(seeds)} seeds for {n} images; pass one seed per image")
        if batch is not None and batch < 1:
            raise UserError(f"--batch {batch} must be at least 1 (images per UNet pass)")
        if batch is not None and batch < n:
            parts = [self._generate(prompts[i:i + batch], ids[i:i + batch], seeds[i:i + batch], steps, guidance,
                                    resolution, negative_prompt, output_type) for i in range(0, n, batch)]
            return np.concatenate(parts) if output_type == "np" else [img for part in parts for img in part]
        return self._generate(prompts, ids, seeds, steps, guidance, resolution, negative_prompt, output_type)

    def _generate(self, prompts: list[str], ids: list[int], seeds: list[int], steps: int, guidance: float,
                  resolution: int | None, negative_prompt: str | None, output_type: str):
        pipe = self.pipe
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # as diffusers decides
        embeds = self.encode(prompts, ids, cfg, negative_prompt)
        size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        index = torch.tensor(ids, dtype=torch.long, device=pipe._execution_device)
        self.route.index = index.repeat(2) if cfg else index  # the UNet sees [uncond; cond]
        try:
            out = pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type=output_type)
        finally:
            self.route.index = None
        return out.images
