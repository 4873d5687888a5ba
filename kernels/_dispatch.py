"""Which implementation an op runs, decided at call time (so tests can flip the switch per test).

- The switch: inside ``use_kernels(False)`` every op runs its plain PyTorch twin (``<op>_ref``); outside
  any such block, ``T2I_FAST_KERNELS=0`` in the environment does the same (it is only read, as the
  default). The trainer's ``--no-kernels`` is ``use_kernels(False)`` around the run. It is the one switch
  of every fast path of ours: the native C++ ops (t2i_fast.native: the 8-bit AdamW step and the
  finiteness check) ask ``kernels_enabled()`` too, before each call.
- Triton path: the tensors are on CUDA and Triton imports, or ``TRITON_INTERPRET=1`` is set (then the
  Triton kernels run on CPU tensors through the interpreter; that is how they are tested without a GPU).
- Otherwise: the fused PyTorch path (a custom ``autograd.Function`` with the same algebra as the kernel).

Nothing here imports Triton or touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

REF, TORCH, TRITON = "ref", "torch", "triton"


# set by use_kernels for the length of a block; a module global rather than a context variable, because
# autograd may run a backward on another thread, which a context variable would not reach
_forced: bool | None = None


def kernels_enabled() -> bool:
    """The switch: the innermost use_kernels block's value, else the environment's default. Cheap enough to
    ask per call (a global, then one environment lookup)."""
    if _forced is not None:
        return _forced
    return os.environ.get("T2I_FAST_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def use_kernels(enabled: bool | None):
    """Within the block, the fused kernels are on (True), off: every op runs its twin (False), or as the
    environment says (None). Blocks nest; the previous setting comes back on exit."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


_TRITON_FOUND: bool | None = None


def triton_available() -> bool:
    """Whether Triton is installed (looked up once, without importing it)."""
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def backend(*tensors: torch.Tensor | None) -> str:
    """REF, TORCH or TRITON for an op whose inputs are `tensors` (None entries are ignored)."""
    if not kernels_enabled():
        return REF
    if not triton_available():
        return TORCH
    ts = [t for t in tensors if t is not None]
    if interpret():
        return TRITON if all(t.device.type == "cpu" for t in ts) else TORCH
    if ts and all(t.is_cuda for t in ts):
        return TRITON
    return TORCH


AUTOCAST_DEVICES = ("cpu", "cuda")


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's where autocast is on for x's device (so a frozen bf16 weight
    meets the fp32 output of an autocast LayerNorm in one dtype, as F.linear would), else the weight's."""
    device = x.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def autocast_off(x: torch.Tensor):
    """A block in which autocast leaves x's device alone (the meta device, which the memory planner traces
    on, has no autocast). Where autocast is off already there is nothing to turn off: entering and leaving an
    autocast block costs ~20 us per call, a tenth of a small layer's step."""
    device = x.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def head_split(d: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two pieces, each >= 16 (tl.dot's minimum): D = D0 + D1 (+ mask).

    40 -> (32, 16) (8 lanes masked: 17% waste instead of 37.5% for padding to 64), 80 -> (64, 16),
    160 -> (128, 32), 64 -> (64, 0), 256 -> (256, 0), 48 -> (32, 16), 100 -> (64, 64).
    """
    if d <= 16:
        return 16, 0
    d0 = 1 << (int(d).bit_length() - 1)
    rest = d - d0
    return (d0, 0) if rest == 0 else (d0, max(16, next_pow2(rest)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs use TF32 on the GPU only where torch's own matmuls are allowed
    to (never in the interpreter); 16-bit inputs keep the compiler default (the flag is moot there)."""
    if dtype != torch.float32:
        return "tf32"
    if not interpret() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
