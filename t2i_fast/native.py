"""Lazy loader of the optional native extension t2i_fast._C (csrc/).

`load()` imports the extension the first time it is called (never at `import t2i_fast`), which registers
the ops t2i_fast::adamw8bit_step and t2i_fast::all_finite with torch.library, and adds their fake (meta)
implementations so torch.compile and FakeTensorMode can trace calls to them. It returns True when the ops
are usable. When the extension is missing (no compiler at install time, a torch ABI mismatch) or
T2I_FAST_NATIVE=0, it returns False, and says so once; callers then use the PyTorch twins.
"""
from __future__ import annotations

import os
import warnings

import torch

_state: dict[str, object] = {}


def disabled_by_env() -> bool:
    return os.environ.get("T2I_FAST_NATIVE", "1").strip().lower() in ("0", "false", "off", "no")


def _register_fakes() -> None:
    @torch.library.register_fake("t2i_fast::adamw8bit_step")
    def _adamw8bit_step_fake(params, grads, state1, state2, absmax1, absmax2, qmaps, qconst, steps, lr,
                             beta1, beta2, eps, weight_decay):
        torch._check(len(grads) == len(params) and len(state1) == len(params),
                     lambda: "adamw8bit_step: all lists must have one entry per parameter")
        for p, g, s1 in zip(params, grads, state1):
            torch._check(g.numel() == p.numel() and s1.numel() == p.numel(),
                         lambda: "adamw8bit_step: grad and state must match the param's size")
        return None

    @torch.library.register_fake("t2i_fast::all_finite")
    def _all_finite_fake(tensors):
        device = tensors[0].device if len(tensors) else torch.device("cpu")
        return torch.empty((), dtype=torch.bool, device=device)


def load() -> bool:
    """Import t2i_fast._C once; True when its ops are registered and enabled."""
    if disabled_by_env():
        _note_once("T2I_FAST_NATIVE=0: using the PyTorch twins of the native ops")
        return False
    if "ok" not in _state:
        try:
            import t2i_fast._C  # noqa: F401  (registers the ops)

            _register_fakes()
            _state["ok"] = True
        except (ImportError, OSError, RuntimeError) as e:
            _state["ok"] = False
            _state["error"] = str(e)
            _note_once(f"the native extension t2i_fast._C is not available ({e}); using the slower PyTorch "
                       "twins. Rebuild with `pip install --no-build-isolation -e .` where a C++ compiler "
                       "is installed.")
    return bool(_state["ok"])


def available() -> bool:
    """Same as load(): whether the native CPU ops can be used in this process."""
    return load()


def _note_once(msg: str) -> None:
    if not _state.get("noted"):
        _state["noted"] = True
        warnings.warn(f"t2i_fast: {msg}", RuntimeWarning, stacklevel=3)
