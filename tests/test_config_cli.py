"""The flat config, its presets, and the CLI generated from it."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from t2i_fast.cli import build_parser
from t2i_fast.config import PRESETS, TrainConfig, resolve_config
from t2i_fast.errors import UserError
from t2i_fast.methods import REGISTRY, get_method, with_defaults


def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_method_defaults_fill_only_what_is_unset():
    ti = with_defaults(TrainConfig(method="textual_inversion"))
    assert ti.lr == get_method("textual_inversion").defaults["lr"] == 5e-3
    assert with_defaults(TrainConfig(method="textual_inversion", lr=0.1)).lr == 0.1
    assert with_defaults(TrainConfig(method="lora")).token == "<sks>"  # GENERAL_DEFAULTS
    with pytest.raises(UserError, match="unknown method 'lorra'; choose one of lora, "):
        with_defaults(TrainConfig(method="lorra"))


def test_every_method_declares_itself_on_its_class():
    """A method is one class: defaults (TrainConfig fields), stop preset, templates, export formats."""
    fields = set(TrainConfig.field_names())
    for name in REGISTRY:
        spec = get_method(name)
        assert spec.name == name
        assert set(spec.defaults) <= fields and {"lr", "max_steps"} <= set(spec.defaults), name
        assert spec.stop.window >= 2 and 0 <= spec.stop.threshold <= 1, name
        assert spec.templates and all("{token}" in t for t in spec.templates), name
        assert set(spec.export_formats) <= {"kohya", "a1111"}, name


def test_method_help_lists_the_registry():
    out = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(name in out for name in REGISTRY)


def test_presets_are_valid_configs():
    for name in PRESETS:
        cfg = TrainConfig.from_preset(name)
        assert cfg.method in REGISTRY


def test_unknown_keys_rejected():
    with pytest.raises(UserError, match="unknown key"):
        TrainConfig.from_dict({"lerning_rate": 1})
    with pytest.raises(UserError, match="unknown preset"):
        resolve_config({}, preset="sd99")


def test_cli_flags_override_preset():
    args = build_parser().parse_args(["train", "--preset", "sd15-lora", "--lr", "0.5", "--no-cache-latents",
                                      "--model", "./sd15"])
    values = {k: v for k, v in vars(args).items() if k not in ("func", "config", "preset", "command")}
    cfg = resolve_config(values, args.preset)
    assert cfg.lr == 0.5 and cfg.cache_latents is False and cfg.resolution == 512


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "t2i_fast.cli", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--class-word" in out and "--cache-latents" in out and "examples:" in out


def test_bundled_concept_keeps_an_explicit_token():
    """Without --images the example concept is used; its own token only where none was given, and the
    generic default (<sks>) where images are given."""
    from t2i_fast import TrainConfig, toy
    from t2i_fast.app import with_bundled_defaults
    from t2i_fast.trainer import fill_defaults

    concept = toy.concept(toy.concepts()[0])
    filled = lambda cfg: fill_defaults(with_bundled_defaults(cfg))  # noqa: E731
    assert filled(TrainConfig()).token == concept.token
    assert filled(TrainConfig(token="<sks>")).token == "<sks>"
    assert filled(TrainConfig(images=str(concept.images_dir))).token == "<sks>"


def test_toy_defaults_fill_only_what_is_unset_and_only_on_the_bundled_model(tiny_model, concept_dir):
    from t2i_fast.app import TOY_DEFAULTS, with_bundled_defaults
    from t2i_fast.trainer import fill_defaults

    filled = lambda cfg: fill_defaults(with_bundled_defaults(cfg))  # noqa: E731
    toy_lora = filled(TrainConfig())
    toy = TOY_DEFAULTS["lora"]
    assert (toy_lora.lr, toy_lora.dvar_window, toy_lora.batch_size) == (toy["lr"], toy["dvar_window"], toy["batch_size"])
    given = filled(TrainConfig(lr=1e-3, dvar_window=50, batch_size=1))
    assert (given.lr, given.dvar_window, given.batch_size) == (1e-3, 50, 1)
    other = filled(TrainConfig(model=str(tiny_model), images=str(concept_dir)))  # not the bundled model
    # None: the method's preset; batch 1 is every method's default
    assert (other.lr, other.dvar_window, other.batch_size) == (get_method("lora").defaults["lr"], None, 1)


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    """The trainer prints where it stopped and how to resume; the command then exits 130, as shells expect."""
    from t2i_fast import app
    from t2i_fast.cli import main

    def interrupted(cfg):
        print("interrupted after step 3; checkpoint saved, continue with --resume", file=sys.stderr)
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "train", interrupted)
    assert main(["train", "--max-steps", "5"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted after step 3")


def test_mixed_precision_on_the_cpu_says_it_trains_in_fp32():
    import torch

    from t2i_fast.runtime import resolve_precision

    with pytest.warns(UserWarning, match="CUDA only; training in fp32"):
        assert resolve_precision("fp16", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32  # the default says nothing


def test_the_library_needs_a_model_and_images(tmp_path):
    """t2i_fast.train fills no bundled defaults (the app layer does): one line saying what to pass."""
    from t2i_fast import train

    with pytest.raises(UserError, match=r"needs cfg\.model .* and cfg\.images .*`t2i-fast train`") as e:
        train(TrainConfig(out=str(tmp_path / "run")))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
