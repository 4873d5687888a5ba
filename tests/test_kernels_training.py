"""Slow tier: the fused kernels change speed, not results. Training the tiny model with kernels on and
off (the plain PyTorch twins) gives the same loss curve and the same adapter, to float32 rounding
accumulated over 50 steps (losses within 1e-5 relative, adapter weights within 2e-6 absolute on weights
of size ~0.2)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from t2i_fast import train
from t2i_fast.formats import LORA_FILE


@pytest.mark.slow
def test_kernels_on_and_off_train_the_same(base_cfg, tmp_path):
    # at a realistic LoRA learning rate; at lr 1e-2 Adam's trajectory on this random model amplifies
    # rounding differences to ~1e-2 by step 50 (measured), which says nothing about the kernels
    cfg = base_cfg.replace(lr=1e-3, max_steps=50, early_stop="none")
    on = train(cfg.replace(out=str(tmp_path / "on"), kernels=True))
    off = train(cfg.replace(out=str(tmp_path / "off"), kernels=False))
    # fp32 reassociation (merged weight vs separate low-rank GEMMs, fused vs SDPA attention) differs at
    # ~1e-7 per op; after 50 Adam steps the curves must still agree to 1e-5 relative
    np.testing.assert_allclose(on.losses, off.losses, rtol=1e-5, atol=1e-7)
    a, b = load_file(on.out / LORA_FILE), load_file(off.out / LORA_FILE)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("env,kernels,fast", [("1", True, True), ("0", True, False), ("1", False, False)])
def test_both_switches_choose_the_attention_processors(base_cfg, monkeypatch, env, kernels, fast):
    """T2I_FAST_KERNELS=0 and --no-kernels both leave diffusers' attention in place (the twin of the fused
    attention keeps the whole score matrix, which only a test should pay for)."""
    from t2i_fast.nn.attention import FastAttnProcessor
    from t2i_fast.trainer import Trainer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("T2I_FAST_KERNELS", env)
    procs = Trainer(base_cfg.replace(kernels=kernels)).comps.unet.attn_processors.values()
    assert all(isinstance(p, FastAttnProcessor) for p in procs) if fast else \
        not any(isinstance(p, FastAttnProcessor) for p in procs)


def test_the_switch_is_a_context_not_the_environment(base_cfg, monkeypatch):
    """use_kernels(False) routes every op to its twin for the block only, nests, and leaves the process
    environment alone; T2I_FAST_KERNELS is read as the default outside any block. A --no-kernels run does
    not write the environment either."""
    import os
    import sys

    import torch

    from t2i_fast.kernels._dispatch import REF, backend, use_kernels

    lora_module = sys.modules["t2i_fast.kernels.lora_linear"]  # the package's attribute is the function

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1")
    x = torch.zeros(1)
    assert backend(x) != REF
    with use_kernels(False):
        assert backend(x) == REF and os.environ["T2I_FAST_KERNELS"] == "1"
        with use_kernels(None):  # as the environment says
            assert backend(x) != REF
        assert backend(x) == REF
    assert backend(x) != REF
    monkeypatch.setenv("T2I_FAST_KERNELS", "0")
    with use_kernels(True):
        assert backend(x) != REF
    assert backend(x) == REF

    monkeypatch.delenv("T2I_FAST_KERNELS")
    seen = []
    twin = lora_module.lora_linear_ref

    def spy(*args, **kw):  # the twin, noting what the environment said while the run used it
        seen.append(os.environ.get("T2I_FAST_KERNELS"))
        return twin(*args, **kw)

    monkeypatch.setattr(lora_module, "lora_linear_ref", spy)
    train(base_cfg.replace(max_steps=1, kernels=False, early_stop="none"))
    assert seen and set(seen) == {None}
