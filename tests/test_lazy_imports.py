"""bitsandbytes, which diffusers imports eagerly, loads only when something uses it (lazy_imports.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_bitsandbytes_loads_on_first_use_only():
    out = run("""
        import sys
        from t2i_fast.models import set_offline
        from t2i_fast.lazy_imports import is_loaded
        set_offline()
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel
        import bitsandbytes
        print(is_loaded("bitsandbytes"), "bitsandbytes.functional" in sys.modules, bitsandbytes.__file__ is not None)
        import bitsandbytes.functional as F
        print(is_loaded("bitsandbytes"), callable(F.optimizer_update_8bit_blockwise), bitsandbytes.optim.AdamW8bit.__name__)
    """)
    assert out.splitlines() == ["False False True", "True True AdamW8bit"]


def test_the_bitsandbytes_optimizer_trains_after_a_deferred_import():
    out = run("""
        import torch
        from t2i_fast.models import set_offline
        set_offline()
        import diffusers  # imports bitsandbytes, deferred
        from t2i_fast.optim import AdamW8bit
        w = torch.nn.Parameter(torch.ones(4096))
        opt = AdamW8bit([w], lr=0.1, backend="bnb")
        (w * w).sum().backward()
        opt.step()
        print(bool((w < 1).all()))
    """)
    assert out == "True"
