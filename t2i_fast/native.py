"""Lazy loader of the optional native extension t2i_fast._C (csrc/), and the switch its ops obey.

`load()` imports the extension the first time it is called (never at `import t2i_fast`), which registers
the ops t2i_fast::adamw8bit_step and t2i_fast::all_finite with torch.library, and adds their fake (meta)
implementations so torch.compile and FakeTensorMode can trace calls to them. It returns True when the ops
are usable, and caches the answer. When the extension is missing (no compiler at install time, a torch ABI
mismatch) it returns False, and says so once; callers then use the PyTorch twins.

`enabled()` is what callers ask before each call: the extension loaded *and* the fast paths are switched
on. The switch is the one the Triton kernels obey (t2i_fast.kernels._dispatch): off inside
`use_kernels(False)` (the trainer's --no-kernels), on inside `use_kernels(True)`, and outside any such
block as T2I_FAST_KERNELS says (default on). It is read at call time, so a block can change between calls.
There is no separate variable for the native ops: T2I_FAST_NATIVE is no longer read (a warning says so
when it is set).
"""
from __future__ import annotations

import os
import warnings

import torch

from .kernels._dispatch import kernels_enabled

_state: dict[str, object] = {}


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
    """Import t2i_fast._C once; True when its ops are registered (whatever the switch says; see enabled())."""
    if "ok" not in _state:
        if "T2I_FAST_NATIVE" in os.environ:
            warnings.warn("t2i_fast: T2I_FAST_NATIVE is no longer read; the native ops follow the kernels' "
                          "switch: T2I_FAST_KERNELS=0, --no-kernels or `with use_kernels(False):` turns "
                          "them off", RuntimeWarning, stacklevel=2)
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
    """Same as load(): whether the native ops can be used in this process (the extension is built and
    loads), whatever the switch says."""
    return load()


def enabled() -> bool:
    """Whether a caller should run the native ops now: the fast paths are switched on (kernels_enabled(), the
    switch of the Triton kernels too) and the extension loaded. Checked per call (per optimizer step), so
    it stays cheap: a global, an environment lookup, and load()'s cached answer. The extension is not
    imported while the switch is off."""
    return kernels_enabled() and load()


def _note_once(msg: str) -> None:
    if not _state.get("noted"):
        _state["noted"] = True
        warnings.warn(f"t2i_fast: {msg}", RuntimeWarning, stacklevel=3)
