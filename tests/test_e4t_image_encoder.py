"""E4T's optional CLIP image backbone (--image-encoder), on the tiny model with a tiny CLIP vision folder built in
code: its features are CLIP's own forward on CLIP-normalised pixels; pre-training with it records the folder,
the width and a fingerprint in the domain file and widens the encoder head; tuning finds the recorded folder by
itself, or a moved copy through --image-encoder, and reads the image through it; a missing or different encoder,
an encoder for a domain made without one, and a folder that is not CLIP vision are refused in one line before
anything is written; the memory planner traces such a domain on the meta device; a run resumes after its encoder
moved."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import t2i_fast
from t2i_fast.e4t_domain import DOMAIN_FILE, image_features
from t2i_fast.e4t_image_encoder import CLIP_MEAN, CLIP_STD, clip_features, fingerprint, load_image_encoder
from t2i_fast.e4t_pretrain import REPORT, pretrain
from t2i_fast.errors import UserError
from t2i_fast.formats import read_safetensors
from t2i_fast.methods.e4t import FILE
from t2i_fast.testing import save_clip_vision, write_concept_images

PRETRAIN = dict(class_word="dog", steps=2, batch_size=2, lr=1e-2, rank=2, resolution=32, checkpoint_every=0,
                progress=False, device="cpu")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip_vision(tmp_path_factory.mktemp("clip") / "clip_vision", seed=0)


@pytest.fixture(scope="module")
def domain_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e4t_clip_domain_images")
    for k in range(3):
        write_concept_images(folder / f"concept_{k}", n=2, size=64, seed=k)
    return folder


@pytest.fixture(scope="module")
def clip_domain(one_thread, tiny_model, domain_images, clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e4t_clip") / "domain"
    pretrain(str(tiny_model), str(domain_images), out=str(out), image_encoder=str(clip_dir), **PRETRAIN)
    return out


@pytest.fixture(scope="module")
def plain_domain(one_thread, tiny_model, domain_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("e4t_plain") / "domain"
    pretrain(str(tiny_model), str(domain_images), out=str(out), **PRETRAIN)
    return out


def _cfg(base_cfg, domain, **kw):
    return base_cfg.replace(**{"method": "e4t", "domain": str(domain), "max_steps": 2, "lr": 1e-2, **kw})


def test_clip_features_are_the_encoders_forward_on_clip_normalised_pixels(clip_dir, one_thread):
    encoder = load_image_encoder(clip_dir)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1  # the encoder's own size: no resize
    x = ((pixels + 1) / 2 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(clip_features(encoder, pixels), encoder(pixel_values=x).image_embeds)
    assert clip_features(encoder, torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 16)  # resized to 32 first


def test_a_folder_without_projection_gives_the_pooled_output(tmp_path, one_thread):
    encoder = load_image_encoder(save_clip_vision(tmp_path / "plain", projection=False))
    assert clip_features(encoder, torch.zeros(1, 3, 32, 32)).shape == (1, 32)  # hidden size, no projection


def test_pretraining_records_the_encoder_and_widens_the_head(clip_domain, plain_domain, clip_dir, tiny_model):
    tensors, meta = read_safetensors(clip_domain / DOMAIN_FILE)
    plain, _ = read_safetensors(plain_domain / DOMAIN_FILE)
    assert json.loads(meta["t2i_fast.image_encoder"]) == str(clip_dir.resolve())
    assert json.loads(meta["t2i_fast.image_encoder_dim"]) == 16
    assert json.loads(meta["t2i_fast.image_encoder_fingerprint"]) == pytest.approx(
        fingerprint(load_image_encoder(clip_dir)))
    # the head's first layer reads the model's own features plus the 16 CLIP features
    assert tensors["encoder.net.1.weight"].shape[1] == plain["encoder.net.1.weight"].shape[1] + 16
    report = json.loads((clip_domain / REPORT).read_text())
    assert report["image_encoder_dim"] == 16 and "image_encoder_fingerprint" not in report


def test_tuning_reads_the_image_through_the_recorded_encoder(base_cfg, clip_domain, clip_dir, concept_dir,
                                                            monkeypatch, one_thread):
    seen = []
    real = image_features

    def spy(comps, pixels, batch=64, image_encoder=None):
        seen.append(image_encoder)
        return real(comps, pixels, batch, image_encoder)

    monkeypatch.setattr(t2i_fast.methods.e4t, "image_features", spy)
    result = t2i_fast.train(_cfg(base_cfg, clip_domain))
    assert len(seen) == 1 and seen[0] is not None
    assert fingerprint(seen[0]) == pytest.approx(fingerprint(load_image_encoder(clip_dir)))
    assert FILE in result.files and result.steps == 2


def test_a_moved_encoder_is_found_through_the_flag(base_cfg, clip_domain, clip_dir, tmp_path, one_thread):
    moved = tmp_path / "moved_clip"
    shutil.copytree(clip_dir, moved)
    result = t2i_fast.train(_cfg(base_cfg, clip_domain, image_encoder=str(moved)))
    assert result.steps == 2 and (result.out / FILE).is_file()


@pytest.mark.parametrize("case, needle", [
    ("missing", "was pre-trained with the image encoder {gone}, which is not there; pass --image-encoder DIR"),
    ("other", "--image-encoder {other} is not the image encoder the domain {domain} was pre-trained with ({clip})"),
    ("unused", "--image-encoder {clip}: the domain {domain} was pre-trained without an image encoder; leave"),
    ("not-clip", "--image-encoder {model}/unet holds a 'UNet2DConditionModel' model, not a CLIP vision model"),
], ids=["recorded-folder-missing", "another-encoder", "domain-without-encoder", "not-a-clip-folder"])
def test_a_wrong_encoder_is_refused_in_one_line_before_anything_is_written(
        base_cfg, clip_domain, plain_domain, domain_images, clip_dir, tiny_model, tmp_path, case, needle, one_thread):
    other, gone = tmp_path / "other_clip", tmp_path / "gone_clip"
    domain, kw = clip_domain, {}
    if case == "missing":  # a domain whose recorded encoder folder was deleted since
        domain = tmp_path / "domain"
        pretrain(str(tiny_model), str(domain_images), out=str(domain), image_encoder=str(save_clip_vision(gone)),
                 **{**PRETRAIN, "steps": 1})
        shutil.rmtree(gone)
    elif case == "other":
        kw["image_encoder"] = str(save_clip_vision(other, seed=1))
    elif case == "unused":
        domain, kw["image_encoder"] = plain_domain, str(clip_dir)
    else:
        kw["image_encoder"] = str(tiny_model / "unet")
    with pytest.raises(UserError) as e:
        t2i_fast.train(_cfg(base_cfg, domain, **kw))
    message = str(e.value)
    clip = clip_dir if case == "unused" else clip_dir.resolve()  # as given, or as the domain file records it
    expected = needle.format(gone=gone.resolve(), other=other, clip=clip, domain=domain, model=tiny_model)
    assert expected in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_folder_that_is_not_clip_vision_before_loading_the_model(tiny_model, domain_images, tmp_path,
                                                                               capsys):
    from t2i_fast.cli import main

    out = tmp_path / "out"
    code = main(["pretrain-e4t", "--model", str(tiny_model), "--domain", str(domain_images), "--class-word", "dog",
                 "--out", str(out), "--steps", "1", "--no-progress", "--image-encoder", str(tmp_path / "nothing")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert re.match(r"^error: --image-encoder \S+nothing: no config.json there; pass a local CLIP vision", err[0])
    assert not out.exists()


def test_the_memory_plan_traces_a_domain_with_an_encoder_on_the_meta_device(base_cfg, clip_domain, one_thread):
    from t2i_fast.memplan import estimate

    plan = estimate(_cfg(base_cfg, clip_domain), target="cpu")
    tensors, _ = read_safetensors(clip_domain / DOMAIN_FILE)
    assert plan.get("trained tensors") == 4 * sum(t.numel() for t in tensors.values())


def test_a_run_resumes_after_its_encoder_moved(base_cfg, clip_domain, clip_dir, tmp_path, one_thread):
    """The encoder's folder is where it lives, not what a step does (the fingerprint checks the weights): --resume
    takes a new --image-encoder and continues to the same result as a run that never stopped."""
    moved = tmp_path / "moved_clip"
    shutil.copytree(clip_dir, moved)
    resumed = _cfg(base_cfg, clip_domain, out=str(tmp_path / "resumed"))
    t2i_fast.train(resumed)
    result = t2i_fast.train(resumed.replace(max_steps=4, resume=True, image_encoder=str(moved)))
    straight = t2i_fast.train(_cfg(base_cfg, clip_domain, max_steps=4, out=str(tmp_path / "straight")))
    assert result.steps == 4 == straight.steps
    a, b = read_safetensors(result.out / FILE)[0], read_safetensors(straight.out / FILE)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
