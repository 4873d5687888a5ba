"""What every layer asks of the machine: the device and precision to run on, a valid resolution, peak memory,
and the on-disk cache folder. It imports nothing of ours but errors.py, so any module may import it."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name not in ("auto", "no", "fp16", "bf16"):
        raise UserError(f"--mixed-precision {name!r} is not one of auto, no, fp16, bf16")
    if device.type != "cuda" and name in ("fp16", "bf16"):
        warnings.warn(f"--mixed-precision {name} applies on CUDA only; training in fp32 on the {device.type}",
                      stacklevel=2)
    if device.type != "cuda" or name == "no":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if name == "fp16" else torch.bfloat16


def check_resolution(resolution: int | None) -> None:
    """--resolution, where given, must be a positive multiple of 8 (the VAE downsamples by 8)."""
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise UserError(f"--resolution {resolution} is not a positive multiple of 8; use e.g. "
                        f"{max(8, resolution // 8 * 8)}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cache_dir() -> Path:
    """Where generated class images (and the app's fallback tiny model) are kept between runs."""
    root = os.environ.get("T2I_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "t2i_fast")
    return Path(root)
