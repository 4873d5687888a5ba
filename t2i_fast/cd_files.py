"""Custom Diffusion's files and attention processors, as everything that reads or writes them needs them: the
method (methods/custom_diffusion.py) saves them, sampling.py and the toy evaluator load them, merge.py
combines them, run_folder.py names them. It sits below all of those and imports none of them.

Files: `pytorch_custom_diffusion_weights.safetensors` (full processor weights under diffusers' keys,
`...attn2.processor.to_k_custom_diffusion.weight`), one `<token>.safetensors` per modifier token, and with
--compress-svd also `pytorch_custom_diffusion_weights_svd.safetensors` (the deltas W - W0 as U, V factors).

Diffusers pitfall (0.42, loaders/unet.py): `unet.load_attn_procs(...)` only installs the processors when
called with `_pipeline=`; without it it builds them and silently drops them. `install_processors` below
sets them on each module itself and checks that they took.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import formats
from .errors import UserError

CD_FILE = "pytorch_custom_diffusion_weights.safetensors"
CD_SVD_FILE = "pytorch_custom_diffusion_weights_svd.safetensors"


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{processor key: Attention} for every cross-attention (attn2) layer, in module order."""
    from diffusers.models.attention_processor import Attention

    return {f"{name}.processor": m for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.endswith("attn2")}


def token_file(token: str) -> str:
    return f"{token}.safetensors"


def base_fingerprint(unet: nn.Module, per_layer: int = 4) -> list[float]:
    """A signature of the base model: per cross-attention layer, the first `per_layer` entries of to_k.weight
    and to_v.weight times a fixed random vector. Compared with a tolerance (same_base), so a run trained in
    bf16/fp16 matches its fp32 base, while another base model (or a fine-tune moving these weights by more
    than ~1%) does not."""
    return weight_signature([w for attn in cross_attention_modules(unet).values()
                             for w in (attn.to_k.weight, attn.to_v.weight)], per_layer)


def weight_signature(weights: list[torch.Tensor], rows: int = 4) -> list[float]:
    """The first `rows` rows of each weight (flattened to 2-D) times a fixed random vector, seeded by the row's
    width: a short signature of a model's weights, compared with same_base's tolerance."""
    sig = []
    for w in weights:
        w = w.detach().cpu().double().flatten(1)
        r = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(w.shape[1]), dtype=torch.float64)
        sig += (w[:rows] @ r).tolist()
    return sig


def same_base(a, b, rtol: float = 1e-2) -> bool:
    """Two fingerprints of the same base model (up to bf16/fp16 rounding)?"""
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b) or not a:
        return False
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return bool((a - b).norm() <= rtol * a.norm())


def processor_class(fast: bool):
    """FastCustomDiffusionAttnProcessor when fast and importable, else diffusers' CustomDiffusionAttnProcessor2_0."""
    if fast:
        try:
            from .nn.attention import FastCustomDiffusionAttnProcessor

            return FastCustomDiffusionAttnProcessor
        except ImportError:
            pass
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    return CustomDiffusionAttnProcessor2_0


def placeholders(unet: nn.Module) -> dict[str, torch.Tensor]:
    """An empty tensor under the key of every other attention layer's processor. diffusers' .bin files
    hold {} there; safetensors cannot, and without these entries diffusers' own
    `unet.load_attn_procs(..., _pipeline=pipe)` fails (it must set a processor on every layer)."""
    cross = cross_attention_modules(unet)
    return {key: torch.empty(0) for key in unet.attn_processors if key not in cross}


def group_state(state: dict[str, torch.Tensor], source) -> dict[str, dict[str, torch.Tensor]]:
    """Flat file keys -> {processor key: processor state_dict}, as diffusers' _process_custom_diffusion does."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".processor") and value.numel() == 0:
            continue  # an untrained layer's placeholder (see CustomDiffusion.save)
        marker = key.find(".processor.")
        if marker < 0 or "custom_diffusion" not in key:
            raise UserError(f"{source}: key {key!r} is not a Custom Diffusion processor weight; "
                            f"pass a file written by --method custom_diffusion (or diffusers' script)")
        groups.setdefault(key[:marker + len(".processor")], {})[key[marker + len(".processor."):]] = value
    return groups


def check_fits(unet: nn.Module, state: dict[str, torch.Tensor], source="state dict") -> dict[str, dict]:
    """The processor groups of `state` (group_state), once each is known to fit a cross-attention layer of
    `unet`; a UserError naming the first that does not (an adapter of another base model)."""
    modules = cross_attention_modules(unet)
    groups = group_state(state, source)
    if not groups:
        raise UserError(f"{source} holds no Custom Diffusion weights; pass a finished custom_diffusion run")
    for key, sub in groups.items():
        attn = modules.get(key)
        if attn is None or "to_k_custom_diffusion.weight" not in sub:
            raise UserError(f"{source}: layer {key} does not exist in this UNet (or has no to_k weight); the "
                            f"adapter was trained on a different base model: load it on the model it was made from")
        k = sub["to_k_custom_diffusion.weight"]
        if tuple(k.shape) != (attn.to_k.out_features, attn.to_k.in_features):
            raise UserError(f"{source}: {key} has shape {tuple(k.shape)} but this UNet's layer is "
                            f"{(attn.to_k.out_features, attn.to_k.in_features)}; use the base model of the run")
    return groups


def install_processors(unet: nn.Module, state: dict[str, torch.Tensor], source="state dict",
                       fast: bool = False) -> list[str]:
    """Install Custom Diffusion processors carrying `state` (flat diffusers keys) on `unet` and verify
    that every one of them is in place with those weights. Returns the processor keys installed."""
    modules = cross_attention_modules(unet)
    groups = check_fits(unet, state, source)
    cls = processor_class(fast)
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    for key, sub in groups.items():
        attn = modules[key]
        k = sub["to_k_custom_diffusion.weight"]
        proc = cls(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in sub, hidden_size=k.shape[0],
                   cross_attention_dim=k.shape[1], out_bias="to_out_custom_diffusion.0.bias" in sub)
        try:
            proc.load_state_dict(sub)
        except RuntimeError as e:
            raise UserError(f"{source}: {key} does not match a Custom Diffusion processor ({e}); "
                            f"re-export it") from None
        attn.set_processor(proc.to(device, dtype))
    # verify: diffusers' own load path can silently keep the default processors
    now = unet.attn_processors
    for key, sub in groups.items():
        proc = now.get(key)
        w = getattr(proc, "to_k_custom_diffusion", None)
        if w is None or not torch.equal(w.weight.detach().cpu().float(),
                                        sub["to_k_custom_diffusion.weight"].to(w.weight.dtype).float()):
            raise RuntimeError(f"Custom Diffusion processor for {key} was not installed from {source}")
    return list(groups)


def svd_compress(delta: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in) -> U (out, r) with S folded in, V (r, in): the fewest top singular values whose sum
    reaches `keep` of the total (the Custom Diffusion paper's compression, 0.6 there)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = s.sum()
    if total <= 0:
        return delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1])
    r = int(torch.searchsorted(torch.cumsum(s, 0) / total, torch.tensor(keep, dtype=s.dtype)).item()) + 1
    r = min(r, len(s))
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def save_compressed(path: Path, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], keep: float,
                    cfg=None) -> dict[str, int]:
    """Write the deltas trained - base of every weight as `<key>.U`, `<key>.V`; returns the ranks kept."""
    tensors, ranks = {}, {}
    for key, w in trained.items():
        u, v = svd_compress(w.detach().float().cpu() - base[key].float().cpu(), keep)
        tensors[f"{key}.U"], tensors[f"{key}.V"] = u, v
        ranks[key] = u.shape[1]
    formats.atomic_save(tensors, path, formats.adapter_metadata(cfg, "custom_diffusion_svd", {"keep": keep}))
    return ranks


def load_compressed(path: Path, unet: nn.Module) -> dict[str, torch.Tensor]:
    """Full processor weights (diffusers keys) from a compressed file: W0 (from `unet`) + U V."""
    tensors, _ = formats.read_safetensors(path)
    modules = cross_attention_modules(unet)
    base_of = {"to_k_custom_diffusion.weight": lambda a: a.to_k.weight,
               "to_v_custom_diffusion.weight": lambda a: a.to_v.weight,
               "to_q_custom_diffusion.weight": lambda a: a.to_q.weight,
               "to_out_custom_diffusion.0.weight": lambda a: a.to_out[0].weight,
               "to_out_custom_diffusion.0.bias": lambda a: a.to_out[0].bias}
    out = {}
    for name in tensors:
        if not name.endswith(".U"):
            continue
        key = name[:-2]
        proc_key, _, sub = key.partition(".processor.")
        attn = modules.get(proc_key + ".processor")
        if attn is None or sub not in base_of or key + ".V" not in tensors:
            raise UserError(f"{path}: {key} does not fit this UNet; load it on the base model of the run")
        u, v = tensors[name], tensors[key + ".V"]
        w0 = base_of[sub](attn).detach().float().cpu()
        delta = (u @ v).reshape(w0.shape) if w0.dim() == 2 else (u @ v).reshape(-1)
        out[key] = w0 + delta
    if not out:
        raise UserError(f"{path} holds no compressed Custom Diffusion weights")
    return out


def token_files(folder: Path, names: list[str]) -> list[str]:
    """The token files of a Custom Diffusion run or merge in `folder` (`names`: the files asked for): those its
    weights file lists (any token spelling), else every `<token>.safetensors` of `names` (e.g. from
    diffusers' script)."""
    if CD_FILE in names:
        from safetensors import safe_open

        with safe_open(str(folder / CD_FILE), framework="pt") as f:
            listed = (f.metadata() or {}).get("t2i_fast.tokens")
        if listed:
            # looked up on disk, not in `names`: an adapter given as the single weights file brings its tokens
            return [token_file(t) for t in json.loads(listed) if (folder / token_file(t)).is_file()]
    return [n for n in names if n.startswith("<") and n.endswith(">.safetensors")]
