"""Shared fixtures: one tiny random SD pipeline folder and a two-image concept, built once per session; the
fused kernels' PyTorch path."""
from __future__ import annotations

import importlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def fused_torch(monkeypatch):
    """The fused kernels' PyTorch path (T2I_FAST_KERNELS=1 without the Triton interpreter), at every input size
    (small inputs otherwise take the twin, which is faster there)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("T2I_FAST_KERNELS", "1")
    import torch

    from t2i_fast import kernels

    # the module, not the function t2i_fast.kernels.lora_linear of the same name
    op = importlib.import_module("t2i_fast.kernels.lora_linear")
    monkeypatch.setattr(op, "SMALL_INPUT", 0)
    monkeypatch.setattr(op, "FEW_ROWS", 0.0)

    assert kernels.backend(torch.zeros(1)) == "torch"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from t2i_fast.testing import save_pipeline

    return save_pipeline("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    from t2i_fast.testing import write_concept_images

    return write_concept_images(tmp_path_factory.mktemp("concept") / "dog", n=2, size=64)


@pytest.fixture
def base_cfg(tiny_model, concept_dir, tmp_path):
    """A fast tiny-model config; tests override what they check."""
    from t2i_fast import TrainConfig

    return TrainConfig(model=str(tiny_model), images=str(concept_dir), class_word="dog", out=str(tmp_path / "run"),
                       resolution=32, max_steps=3, num_samples=0, progress=False, lora_rank=8)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny tensors on 2 shared cores run ~10x faster than with two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
