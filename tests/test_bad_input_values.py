"""Bad values rather than bad folders: option values out of range, config and concepts values of the wrong
type, images that are files or decompression bombs or too small, model folders with pickle weights, adapters
that are corrupt or belong to another base model. Each ends in one "error:" line (exit status 2) and leaves
no output behind; none ends in a traceback."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from t2i_fast import TrainConfig, app, train
from t2i_fast.cli import main
from t2i_fast.errors import UserError

QUICK = dict(max_steps=1, num_samples=0, progress=False, early_stop="none", evaluate=False)


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code, lines, out=None, *needles):
    """Exit status 2, the last stderr line an "error:" line holding every needle, no traceback, no output."""
    assert code == 2, lines
    assert not any("Traceback" in line for line in lines), lines
    assert lines and lines[-1].startswith("error: "), lines
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    assert out is None or not Path(out).exists(), "a refused command must leave nothing behind"


@pytest.fixture
def common(tiny_model, concept_dir):
    return ["train", "--model", tiny_model, "--images", concept_dir, "--class-word", "dog", "--resolution", 32,
            "--max-steps", 1, "--num-samples", 0, "--no-progress"]


# --------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", "nan", "--lr nan"),
    ("--lr", "inf", "--lr inf"),
    ("--adam-beta1", 2, "--adam-beta1 2.0"),
    ("--adam-beta2", 1, "--adam-beta2 1.0"),
    ("--adam-eps", -1, "--adam-eps -1.0"),
    ("--weight-decay", -1, "--weight-decay -1.0"),
    ("--max-grad-norm", "nan", "--max-grad-norm nan"),
    ("--snr-gamma", -1, "--snr-gamma -1.0"),
    ("--lora-alpha", 0, "--lora-alpha 0.0"),
    ("--token-lr", -0.1, "--token-lr -0.1"),
    ("--prior-loss-weight", -1, "--prior-loss-weight -1.0"),
    ("--seed", -1, "--seed -1"),
    ("--crop-variants", 0, "--crop-variants 0"),
    ("--token", "", "--token is empty"),
    ("--token", "  ", "--token is empty"),
], ids=lambda v: str(v) if not isinstance(v, str) or v.strip() else "empty")
def test_bad_option_value(capsys, tmp_path, common, flag, value, needle):
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, flag, value, "--out", out)
    assert_one_line_error(code, lines, out, needle)


def test_textual_inversion_refuses_a_template_without_the_token(capsys, tmp_path, common):
    """The token is all textual inversion trains: a template without {token} would train nothing."""
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--method", "textual_inversion", "--template", "a photo of a {cls}",
                          "--out", out)
    assert_one_line_error(code, lines, out, "has no {token}: the token, all that trains, would never be seen")


@pytest.mark.parametrize("method,flag,value,owner", [
    ("lora", "--domain", "some/domain", "e4t"),
    ("lora", "--image-encoder", "clip", "e4t"),
    ("textual_inversion", "--freeze-model", "crossattn", "custom_diffusion"),
    ("lora", "--compress-svd", 0.6, "custom_diffusion"),
    ("dreambooth", "--stage1-steps", 10, "two_stage"),
    ("e4t", "--stage2-unet", "full", "two_stage"),
])
def test_an_option_of_another_method_is_refused(capsys, tmp_path, common, method, flag, value, owner):
    """An option that only other methods read would be silently ignored: the run is refused instead."""
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--method", method, flag, value, "--out", out)
    assert_one_line_error(code, lines, out, f"{flag} {value} is an option of --method {owner}",
                          f"which --method {method} does not use")


def test_a_preset_of_another_method_is_refused_naming_the_preset(capsys, tmp_path, tiny_model, concept_dir):
    """--preset sd15-two-stage sets the stage options; with --method lora the error names the preset, not
    an option the user never typed."""
    out = tmp_path / "out"
    code, lines = run_cli(capsys, "train", "--model", tiny_model, "--images", concept_dir, "--token", "<sks>",
                          "--preset", "sd15-two-stage", "--method", "lora", "--out", out)
    assert_one_line_error(code, lines, out, "--preset sd15-two-stage sets --stage1-steps 500 for --method two_stage",
                          "which --method lora does not use")


def test_an_option_of_another_method_is_refused_in_the_python_api(base_cfg):
    with pytest.raises(UserError, match="--freeze-model crossattn is an option of --method custom_diffusion"):
        train(base_cfg.replace(method="lora", freeze_model="crossattn"))
    assert not Path(base_cfg.out).exists()
    # its own method's option, and another method's option left at its default, both pass the check
    from t2i_fast.config import check_method_options

    check_method_options(base_cfg.replace(method="custom_diffusion", freeze_model="crossattn"))
    check_method_options(base_cfg.replace(method="textual_inversion", compress_svd=0.0, stage2_unet="lora"))


def test_bad_option_value_in_the_python_api(base_cfg):
    with pytest.raises(UserError, match="--adam-eps"):
        train(base_cfg.replace(adam_eps=-1.0))
    assert not Path(base_cfg.out).exists()


# ------------------------------------------------------------------------------- config file value types
@pytest.mark.parametrize("name,text,needle", [
    ("cfg.toml", 'center_crop = "no"\n', "center_crop = 'no' must be a bool"),
    ("cfg.toml", "random_flip = 1\n", "random_flip = 1 must be a bool"),
    ("cfg.toml", "max_steps = 10.5\n", "max_steps = 10.5 must be an int"),
    ("cfg.toml", 'resolution = "32"\n', "resolution = '32' must be an int"),
    ("cfg.toml", "lr = nan\n", "lr = nan must be a finite number"),
    ("cfg.json", '{"seed": true}', "seed = True must be an int"),
    ("cfg.json", '{"lr": NaN}', "lr = nan must be a finite number"),
    ("cfg.json", '{"method": ["lora"]}', "method = ['lora'] must be a string"),
    ("cfg.json", '{"class_word": null}', "class_word = None must be a string"),
], ids=["bool-as-string", "bool-as-int", "int-as-float", "int-as-string", "toml-nan", "int-as-bool",
        "json-nan", "string-as-list", "string-as-null"])
def test_config_file_value_of_the_wrong_type(capsys, tmp_path, common, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--config", path, "--out", out)
    assert_one_line_error(code, lines, out, str(path), needle)


def test_config_values_of_the_right_type_pass():
    cfg = TrainConfig.from_dict({"lr": 1, "center_crop": False, "max_steps": 10, "resolution": None})
    assert cfg.lr == 1 and cfg.max_steps == 10  # an int is a fine float


def test_wrong_type_in_the_python_api():
    with pytest.raises(UserError, match="--center-crop 'no' must be a bool"):
        TrainConfig(center_crop="no")


@pytest.mark.parametrize("entry,needle", [
    ({"token": 5}, "token = 5 must be a string"),
    ({"class_word": ["dog"]}, "class_word = ['dog'] must be a string"),
    ({"class_prompt": 3}, "class_prompt = 3 must be a string"),
    ({"token": " "}, "token is empty"),
], ids=["token-int", "class-word-list", "class-prompt-int", "token-blank"])
def test_concepts_value_of_the_wrong_type(capsys, tmp_path, common, concept_dir, entry, needle):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"images": str(concept_dir), **entry}]))
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--method", "custom_diffusion", "--concepts", concepts, "--out", out)
    assert_one_line_error(code, lines, out, str(concepts), "entry 1", needle)


def test_concepts_images_not_a_string(capsys, tmp_path, common, concept_dir):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"images": [str(concept_dir)]}]))
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--method", "custom_diffusion", "--concepts", concepts, "--out", out)
    assert_one_line_error(code, lines, out, "images = [", "must be a string")


# ---------------------------------------------------------------------------------------------- images
def test_images_given_a_file(capsys, tmp_path, tiny_model, concept_dir):
    image = sorted(Path(concept_dir).glob("*.png"))[0]
    out = tmp_path / "out"
    code, lines = run_cli(capsys, "train", "--model", tiny_model, "--images", image, "--out", out)
    assert_one_line_error(code, lines, out, str(image), "is a file", str(image.parent))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels: Pillow's bomb check reads only the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_image(capsys, tmp_path, tiny_model, concept_dir):
    images = tmp_path / "imgs"
    shutil.copytree(concept_dir, images)
    _png_header_only(images / "huge.png", 30000, 30000)  # 900 M pixels, over twice Pillow's limit
    out = tmp_path / "out"
    code, lines = run_cli(capsys, "train", "--model", tiny_model, "--images", images, "--resolution", 32,
                          "--out", out)
    assert_one_line_error(code, lines, out, str(images / "huge.png"), "decompression bomb")


def test_images_smaller_than_the_resolution_warn(concept_dir):
    from t2i_fast.data import ConceptImages

    with pytest.warns(UserWarning, match=r"2 of 2 images .* smaller than the training resolution of 128 px"):
        ConceptImages(concept_dir, 128)  # the concept's images are 64 px


def test_images_at_the_resolution_do_not_warn(concept_dir, recwarn):
    from t2i_fast.data import ConceptImages

    ConceptImages(concept_dir, 64)
    assert not [w for w in recwarn if "smaller than the training resolution" in str(w.message)]


# ------------------------------------------------------------------------------------ model weights
def test_model_folder_with_only_bin_weights(capsys, tmp_path, tiny_model, concept_dir):
    """Weights load only from safetensors: a .bin-only component is refused, saying how to convert."""
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    out = tmp_path / "out"
    code, lines = run_cli(capsys, "train", "--model", model, "--images", concept_dir, "--resolution", 32,
                          "--max-steps", 1, "--num-samples", 0, "--no-progress", "--out", out)
    assert_one_line_error(code, lines, out, str(model / "unet"), ".bin", "save_pretrained")


def test_model_given_as_a_pickle_checkpoint(capsys, tmp_path, concept_dir):
    model = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, model)
    out = tmp_path / "out"
    code, lines = run_cli(capsys, "train", "--model", model, "--images", concept_dir, "--out", out)
    assert_one_line_error(code, lines, out, str(model), "safetensors only", "from_single_file")


# ------------------------------------------------------------------------ adapters: corrupt, other base
@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A model of the tiny topology with a 48-wide text encoder (the tiny one's is 32): another base model."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_fast import testing

    tokenizer = testing.byte_level_clip_tokenizer()
    text, unet, vae = testing.model_configs("tiny", len(tokenizer))
    text["hidden_size"] = unet["cross_attention_dim"] = 48
    torch.manual_seed(1)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**vae), text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                   tokenizer=tokenizer, unet=UNet2DConditionModel(**unet), scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("other") / "model"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


METHODS = {"lora": dict(method="lora"), "ti": dict(method="textual_inversion"),
           "cd": dict(method="custom_diffusion")}
FILES = {"lora": "pytorch_lora_weights.safetensors", "ti": "learned_embeds.safetensors",
         "cd": "pytorch_custom_diffusion_weights.safetensors", "cd-token": "<sks>.safetensors"}


def _runs(root: Path, model, concept_dir, **extra) -> dict[str, Path]:
    """Without a model or concept_dir: the bundled ones, which the app layer fills in."""
    runs = {}
    for name, kw in METHODS.items():
        runs[name] = root / name
        app.train(TrainConfig(model=str(model) if model else None, images=str(concept_dir) if concept_dir else None,
                              class_word="dog", token="<sks>", out=str(runs[name]), resolution=32, **QUICK, **kw,
                              **extra))
    return runs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model, concept_dir):
    return _runs(tmp_path_factory.mktemp("tiny_runs"), tiny_model, concept_dir)


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory, other_model, concept_dir):
    return _runs(tmp_path_factory.mktemp("other_runs"), other_model, concept_dir)


def _damaged(run: Path, file: str, how: str, dest: Path) -> Path:
    """A copy of `run` with `file` cut in half or overwritten with bytes that are no safetensors file."""
    shutil.copytree(run, dest)
    data = (dest / file).read_bytes()
    (dest / file).write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a safetensors file" * 8)
    return dest


DAMAGE = [(m, f, how) for m, f in (("lora", "lora"), ("ti", "ti"), ("cd", "cd"), ("cd", "cd-token"))
          for how in ("truncated", "garbage")]


def _sample(tiny_model, adapter, out):
    return ["sample", "--model", tiny_model, "--adapter", adapter, "--prompt", "a photo of <sks> dog", "--n", 1,
            "--steps", 1, "--out", out]


@pytest.mark.parametrize("method,file,how", DAMAGE, ids=[f"{f}-{h}" for _, f, h in DAMAGE])
def test_sample_with_a_damaged_adapter(capsys, tmp_path, tiny_model, tiny_runs, method, file, how):
    run = _damaged(tiny_runs[method], FILES[file], how, tmp_path / "run")
    out = tmp_path / "imgs"
    code, lines = run_cli(capsys, *_sample(tiny_model, run, out))
    assert_one_line_error(code, lines, out, str(run / FILES[file]), "not a readable safetensors file")


@pytest.mark.parametrize("method", ["lora", "ti", "cd"])
def test_sample_with_an_adapter_of_another_base_model(capsys, tmp_path, tiny_model, other_runs, method):
    out = tmp_path / "imgs"
    code, lines = run_cli(capsys, *_sample(tiny_model, other_runs[method], out))
    assert_one_line_error(code, lines, out, str(other_runs[method]), "base model")


@pytest.mark.parametrize("method,fmt", [("lora", "kohya"), ("ti", "a1111")])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_export_a_damaged_adapter(capsys, tmp_path, tiny_runs, method, fmt, how):
    run = _damaged(tiny_runs[method], FILES[method], how, tmp_path / "run")
    code, lines = run_cli(capsys, "export", run, "--format", fmt)
    assert_one_line_error(code, lines, run / "export", str(run / FILES[method]), "not a readable safetensors")


@pytest.mark.parametrize("file", ["cd", "cd-token"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_merge_a_damaged_run(capsys, tmp_path, tiny_runs, file, how):
    run = _damaged(tiny_runs["cd"], FILES[file], how, tmp_path / "run")
    out = tmp_path / "merged"
    code, lines = run_cli(capsys, "merge", run, tiny_runs["cd"], "--out", out)
    assert_one_line_error(code, lines, out, str(run / FILES[file]), "not a readable safetensors")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_init_embeddings_damaged(capsys, tmp_path, common, tiny_runs, how):
    run = _damaged(tiny_runs["ti"], FILES["ti"], how, tmp_path / "run")
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--init-embeddings", run / FILES["ti"], "--out", out)
    assert_one_line_error(code, lines, out, str(run / FILES["ti"]), "not a readable safetensors")


def test_init_embeddings_of_another_base_model(capsys, tmp_path, common, other_runs):
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *common, "--init-embeddings", other_runs["ti"] / FILES["ti"], "--out", out)
    assert_one_line_error(code, lines, out, "48-wide", "32-wide")


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """1-step runs on the bundled toy model (the only one `t2i-fast eval` scores) and its example concept."""
    return _runs(tmp_path_factory.mktemp("toy_runs"), None, None)


@pytest.mark.parametrize("method,file,how", DAMAGE, ids=[f"{f}-{h}" for _, f, h in DAMAGE])
def test_eval_a_damaged_run(capsys, tmp_path, toy_runs, method, file, how):
    run = _damaged(toy_runs[method], FILES[file], how, tmp_path / "run")
    code, lines = run_cli(capsys, "eval", run, "--n-images", 1, "--steps", 1)
    assert_one_line_error(code, lines, run / "eval.json", str(run / FILES[file]))


def test_eval_a_run_of_another_base_model(capsys, tiny_runs):
    run = tiny_runs["lora"]
    code, lines = run_cli(capsys, "eval", run, "--n-images", 1, "--steps", 1)
    assert_one_line_error(code, lines, run / "eval.json", str(run), "not the bundled toy model")


# ------------------------------------------------------------------------------------------- notices
def test_no_kernels_community_notices(tmp_path):
    """Importing bitsandbytes (diffusers does, in every command that loads a model) logs two lines about
    kernels-community's 4-bit CPU matmul on CPUs with AVX512-BF16 when the `kernels` package is installed; the
    CLI drops exactly those. A fresh interpreter, since bitsandbytes logs them once, on import: any command
    sets the filters up (here a quick failing one), then the import comes."""
    code = ("from t2i_fast.cli import main; main(['export', 'nope', '--format', 'kohya']); "
            "import bitsandbytes; import logging; logging.getLogger('bitsandbytes').warning('still shown')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr and "gemm_4bit" not in done.stderr, done.stderr
    assert "still shown" in done.stderr  # only those two are dropped


# --------------------------------------------------------------------------------- pickle work files
class _Payload:
    """Pickles to a call that creates a marker file: what loading an untrusted pickle can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pretrain_work_files_load_no_code(tmp_path):
    from t2i_fast.toy import pretrain

    marker = tmp_path / "ran"
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"step": 1, "modules": {}, "opt": _Payload(marker)}, work / "x.ckpt")
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(pickle.UnpicklingError):
        pretrain.run_loop("x", work, {}, list(layer.parameters()), 1, 1e-3, 0, None, 1, True, print)
    assert not marker.exists()


def test_encoder_work_file_loads_no_code(tmp_path):
    from t2i_fast.toy import encoder

    marker = tmp_path / "ran"
    torch.save({"modules": {"encoder": _Payload(marker)}}, tmp_path / "encoder.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        encoder.export_encoder(tmp_path, tmp_path)
    assert not marker.exists()
