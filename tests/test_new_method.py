"""A new method is one file plus one registry line: a method written outside the package (it trains the
UNet's normalisation scales and shifts) is registered with one entry and then trains, stops by its own
preset, checks its own options, saves, loads back through t2i_fast.sample's loader and is refused by
export, with nothing else edited."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import t2i_fast
from t2i_fast.errors import UserError
from t2i_fast.methods import REGISTRY

METHOD_FILE = '''
"""Norm tuning: only the UNet's GroupNorm/LayerNorm weights and biases train."""
from pathlib import Path

import torch

from t2i_fast import formats
from t2i_fast.errors import UserError
from t2i_fast.methods.base import Method
from t2i_fast.stopping import StopPreset

FILE = "norm_weights.safetensors"


class NormTuning(Method):
    name = "norm_tuning"
    uses_prior = False
    defaults = dict(lr=3e-2, max_steps=9, weight_decay=0.0)
    stop = StopPreset(4, 0.5, 9, 3)
    templates = ("a picture of {token} {cls}",)
    saves = "normalisation weights"

    @classmethod
    def check(cls, cfg):
        if cfg.batch_size > 1:
            raise UserError("norm_tuning trains with --batch-size 1")

    def setup(self, comps):
        super().setup(comps)
        comps.unet.requires_grad_(False)
        self.norms = {name: p for name, p in comps.unet.named_parameters() if "norm" in name}
        for p in self.norms.values():
            p.requires_grad_(True)

    def param_groups(self):
        return [{"params": list(self.norms.values())}]

    def trainable_state(self):
        return dict(self.norms)

    def save(self, out: Path):
        formats.atomic_save(self.norms, out / FILE, {"t2i_fast.kind": "norm_tuning"})
        return [FILE]

    @classmethod
    def load(cls, pipe, folder, names):
        if FILE not in names:
            return []
        tensors, _ = formats.read_safetensors(folder / FILE)
        pipe.unet.load_state_dict(tensors, strict=False)
        return [FILE]
'''


@pytest.fixture
def norm_tuning(tmp_path, monkeypatch):
    (tmp_path / "norm_tuning_method.py").write_text(textwrap.dedent(METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REGISTRY, "norm_tuning", "norm_tuning_method:NormTuning")  # the one registry line
    return "norm_tuning"


def test_a_new_method_is_one_file_and_one_registry_line(norm_tuning, base_cfg, tiny_model, tmp_path, one_thread):
    cfg = base_cfg.replace(method=norm_tuning, max_steps=None, lr=None, probe_every=1)

    with pytest.raises(UserError, match="--batch-size 1"):  # its own check, before anything is written
        t2i_fast.train(cfg.replace(batch_size=2))
    assert not (tmp_path / "run").exists()

    result = t2i_fast.train(cfg)
    report = result.report
    assert report["method"] == "norm_tuning" and report["config"]["lr"] == 3e-2  # its defaults
    assert report["early_stop"]["cap"] == 9 and report["early_stop"]["window_steps"] == 4  # its stop preset
    assert 4 <= result.steps <= 9
    assert "norm_weights.safetensors" in result.files
    assert json.loads((result.out / "report.json").read_text())["files"][0] == "norm_weights.safetensors"

    from t2i_fast.trainer import Trainer

    streams = Trainer(cfg.replace(out=str(tmp_path / "other"))).streams
    assert streams[0].prompts == ["a picture of <sks> dog"]  # its templates

    from t2i_fast.formats import read_safetensors
    from t2i_fast.sampling import build_pipeline

    pipe = build_pipeline(tiny_model, result.out, progress=False)  # through the class's own loader
    tensors, _ = read_safetensors(result.out / "norm_weights.safetensors")
    base = build_pipeline(tiny_model, progress=False)
    name = next(iter(tensors))
    assert torch.equal(pipe.unet.state_dict()[name], tensors[name])
    assert not torch.equal(base.unet.state_dict()[name], tensors[name])  # it trained

    from t2i_fast.export import main as export_main

    with pytest.raises(UserError, match="method norm_tuning has no kohya format: it saves normalisation weights"):
        export_main([str(result.out), "--format", "kohya"])

    # --overwrite removes the files the report lists as written, whatever the method named them
    (result.out / "notes.txt").write_text("mine")
    t2i_fast.train(cfg.replace(method="lora", overwrite=True, max_steps=2, early_stop="none"))
    assert not (result.out / "norm_weights.safetensors").exists() and (result.out / "notes.txt").read_text() == "mine"
