"""Aspect-ratio buckets (--buckets): the bucket list and assignment, crops that cover the bucket, batches of one
bucket drawn with every image as likely as without buckets, class images cropped to the batch's bucket, the
probe's fixed batch, SDXL's time ids, end-to-end runs on SD 1.x and SDXL; and with --buckets off, the batches
of the code before buckets."""
from __future__ import annotations

import math
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_fast import TrainConfig, train
from t2i_fast.batches import BatchSource, Stream
from t2i_fast.buckets import bucket_sizes, cover_box, nearest_bucket
from t2i_fast.cli import main
from t2i_fast.data import ConceptImages, encode_distribution, sample_latents
from t2i_fast.errors import UserError
from t2i_fast.models import load_components
from t2i_fast.probe import build_probe_batch, probe_images

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def write_images(folder, sizes, seed=3):
    """One deterministic, textured PNG per (width, height), named 0.png, 1.png, ... in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        arr = (np.arange(w * h * 3).reshape(h, w, 3) * (k + seed) % 251).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{k}.png")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A wide (2:1), a tall (1:2) and a square image."""
    return write_images(tmp_path_factory.mktemp("shapes") / "dog", [(200, 100), (100, 200), (64, 64)])


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(tiny_model)


# --- the bucket list and assignment

@pytest.mark.parametrize("resolution,step", [(32, 8), (64, 8), (512, 64), (1024, 64)])
def test_buckets_are_multiples_within_the_area(resolution, step):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0, (w, h)
        assert w * h <= resolution ** 2, (w, h)
        assert resolution // 2 <= min(w, h) and max(w, h) <= 2 * resolution, (w, h)
        assert (h, w) in sizes  # every tall bucket has its wide twin
    assert len(set(sizes)) == len(sizes)


def test_sdxl_resolution_has_kohyas_buckets():
    sizes = bucket_sizes(1024)
    for size in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (896, 1152), (768, 1344)]:
        assert size in sizes, size


def test_images_go_to_the_bucket_of_nearest_aspect():
    sizes = bucket_sizes(1024)
    assert nearest_bucket(1920, 1080, sizes) == (1344, 768)  # 16:9
    assert nearest_bucket(1080, 1920, sizes) == (768, 1344)
    assert nearest_bucket(3000, 3000, sizes) == (1024, 1024)
    assert nearest_bucket(1024, 768, bucket_sizes(512)) == (576, 448)  # 4:3 at 512
    assert nearest_bucket(200, 100, bucket_sizes(32)) == (40, 24)  # 2:1 at 32: 5:3 is nearer than 3:1
    assert nearest_bucket(10000, 100, bucket_sizes(32)) == (64, 16)  # beyond the widest: the widest
    for resolution in (32, 512, 1024):
        sizes = bucket_sizes(resolution)
        for aspect in np.exp(np.linspace(-1.6, 1.6, 81)):
            w, h = round(1000 * aspect), 1000
            got = nearest_bucket(w, h, sizes)
            gap = abs(math.log(got[0] / got[1]) - math.log(w / h))
            assert all(gap <= abs(math.log(bw / bh) - math.log(w / h)) + 1e-12 for bw, bh in sizes)
            assert nearest_bucket(h, w, sizes) == got[::-1]  # tall and wide alike


# --- crops

def test_bucketed_images_are_cropped_to_cover_their_bucket(shapes):
    images = ConceptImages(shapes, 32, buckets=True)
    assert images.sizes == [(40, 24), (24, 40), (32, 32)]
    # wide: resized by max(40/200, 24/100) = 0.24 it is 48 x 24, so the box is 40 / 0.24 = 167 x 100, centred
    assert cover_box(200, 100, (40, 24)) == (167, 100)
    assert images.variant(0, 0).box == (16, 0, 183, 100) and images.variant(1, 0).box == (0, 16, 100, 183)
    assert images.variant(2, 0).box == (0, 0, 64, 64)
    for i, (w, h) in enumerate(images.sizes):
        assert images.pixels(i, 0).shape == (3, h, w)
        torch.testing.assert_close(images.pixels(i, 0).flip(-1), images.pixels(i, 1))  # the flip variant

    crops = ConceptImages(shapes, 32, center_crop=False, crop_variants=3, buckets=True, random_flip=False)
    assert crops.num_variants == 3
    for i, (w, h) in enumerate(crops.sizes):
        src_w, src_h = crops.images[i].size
        full_w, full_h = cover_box(src_w, src_h, (w, h))
        for v in crops.variants[i]:
            left, top, right, bottom = v.box
            assert 0 <= left < right <= src_w and 0 <= top < bottom <= src_h
            assert 0.8 * full_w - 1 <= right - left <= full_w and 0.8 * full_h - 1 <= bottom - top <= full_h
            assert abs((right - left) / (bottom - top) - w / h) < 0.05  # the bucket's aspect
        assert crops.pixels(i, 2).shape == (3, h, w)
    assert len({v.box for v in crops.variants[0]}) == 3


def test_bad_resolution_and_rescale_variants_are_refused_in_one_line(shapes, tiny_model, tmp_path, capsys):
    with pytest.raises(UserError, match="multiple of 64") as e:
        ConceptImages(shapes, 520, buckets=True)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="rescale"):
        ConceptImages(shapes, 32, buckets=True, rescale_variants=2)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--images", str(shapes), "--method", "custom_diffusion",
                 "--resolution", "32", "--buckets", "--class-word", "dog", "--out", str(out), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "--buckets" in err[0] and "custom_diffusion" in err[0], err
    assert not out.exists()
    code = main(["train", "--model", str(tiny_model), "--images", str(shapes), "--resolution", "520", "--buckets",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--buckets needs a --resolution that is a multiple of 64" in err[0], err
    assert not out.exists()


# --- batches

def sd_streams(folder, class_folder=None, buckets=True, **kw):
    images = ConceptImages(folder, 32, buckets=buckets, **kw)
    prior = None
    if class_folder is not None:
        cls = ConceptImages.from_folders([class_folder], 32)
        prior = Stream(cls, ["a dog"], weight=0.5, captions=["a dog"] * len(cls))
    return [Stream(images, ["a photo of <sks> dog", "a <sks> dog"])], prior


def test_each_batch_holds_one_bucket_and_class_images_are_cropped_to_it(shapes, comps, tmp_path):
    classes = write_images(tmp_path / "cls", [(64, 64), (48, 80), (80, 48)], seed=5)
    streams, prior = sd_streams(shapes, classes)
    source = BatchSource(streams, comps, torch.device("cpu"), prior)
    assert set(source.prior_views) == {(40, 24), (24, 40), (32, 32)}  # one view per bucket in use
    f = comps.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        items = source.draw_items(g, 3)
        batch = source.make(items, g)
        (size,) = {streams[0].images.sizes[i] for s, i, *_ in items if s == 0}
        assert batch.latents.shape == (6, 4, size[1] // f, size[0] // f)
        assert batch.weights.tolist() == [1.0] * 3 + [0.5] * 3
        seen.add(size)
    assert seen == {(40, 24), (24, 40), (32, 32)}
    # a class item reads its image cropped to the batch's bucket, from the view's cache
    view, cache = source.prior_views[(40, 24)]
    # the 48 x 80 class image: a 48 x round(48 * 24 / 40) = 29 box, top (80 - 29) // 2 = 25
    assert view.variant(1, 0).box == (0, 25, 48, 54)
    mean, std = encode_distribution(comps.vae, view.pixels(1, 0)[None])
    assert torch.equal(cache.get(1, 0)[0], mean[0]) and torch.equal(cache.get(1, 0)[1], std[0])


def test_cached_and_uncached_bucketed_batches_agree(shapes, comps, tmp_path):
    classes = write_images(tmp_path / "cls", [(64, 64), (48, 80)], seed=5)
    batches = []
    for cache in (True, False):
        streams, prior = sd_streams(shapes, classes)
        source = BatchSource(streams, comps, torch.device("cpu"), prior, cache_latents=cache)
        batches.append(source.draw(torch.Generator().manual_seed(7), 2))
    torch.testing.assert_close(batches[0].latents, batches[1].latents, rtol=0, atol=0)
    torch.testing.assert_close(batches[0].noise, batches[1].noise, rtol=0, atol=0)


def test_every_image_stays_as_likely_as_without_buckets(tmp_path):
    """One concept: each image 1/n. Two concepts of 3 and 2 images: each concept 1/2, so 1/6 and 1/4."""
    a = write_images(tmp_path / "a", [(200, 100), (120, 100), (100, 200)])
    b = write_images(tmp_path / "b", [(100, 200), (64, 64)])
    fake = types.SimpleNamespace(family="sd", scheduler=types.SimpleNamespace(config=types.SimpleNamespace(
        num_train_timesteps=1000)))
    for folders, expected in [([a], [1 / 3] * 3), ([a, b], [1 / 6] * 3 + [1 / 4] * 2)]:
        streams = [Stream(ConceptImages(f, 32, buckets=True), ["p"]) for f in folders]
        source = BatchSource(streams, fake, torch.device("cpu"), cache_latents=False)
        g = torch.Generator().manual_seed(0)
        counts, draws = Counter(), 3000
        for _ in range(draws):
            items = source.draw_items(g, 2)
            assert len({streams[s].images.sizes[i] for s, i, *_ in items}) == 1
            counts.update((s, i) for s, i, *_ in items)
        order = [(s, i) for s in range(len(streams)) for i in range(len(streams[s].images))]
        freq = [counts[k] / (2 * draws) for k in order]
        assert np.allclose(freq, expected, atol=0.02), (freq, expected)


# What the code before buckets drew for this set-up (generated with the commit before --buckets existed):
# the items of 4 draw_items(generator seeded 0, 2) calls and image 0's random crop boxes.
BEFORE_ITEMS = [[(0, 2, 0, 1), (1, 1, 1, 1), (2, 1, 1, 0), (2, 0, 0, 0)],
                [(0, 0, 0, 2), (0, 0, 2, 2), (2, 1, 0, 0), (2, 1, 1, 0)],
                [(1, 1, 0, 1), (0, 0, 1, 0), (2, 0, 1, 0), (2, 0, 0, 0)],
                [(0, 1, 5, 1), (1, 1, 2, 1), (2, 0, 1, 0), (2, 1, 1, 0)]]
BEFORE_BOXES = [(66, 2, 97, False), (66, 2, 97, True), (35, 0, 85, False), (35, 0, 85, True), (1, 3, 81, False),
                (1, 3, 81, True)]


def test_without_buckets_the_batches_are_what_they_were(tmp_path, comps):
    root = tmp_path / "before"
    a = write_images(root / "a", [(200, 100), (100, 200), (64, 64)])
    b = write_images(root / "b", [(90, 60), (60, 90)])
    cls = write_images(root / "cls", [(64, 64), (48, 80)])
    ia = ConceptImages(a, 32, center_crop=False, crop_variants=3, seed=0)
    ib = ConceptImages(b, 32, center_crop=False, crop_variants=3, seed=1)
    assert [(v.left, v.top, v.size, v.flip) for v in ia.variants[0]] == BEFORE_BOXES
    assert ia.sizes == [(32, 32)] * 3 and not ia.bucketed
    prior = Stream(ConceptImages.from_folders([cls], 32), ["c"], captions=["c0", "c1"])
    streams = [Stream(ia, ["p1", "p2", "p3"]), Stream(ib, ["q1", "q2"])]
    source = BatchSource(streams, comps, torch.device("cpu"), prior)
    assert source.pools is None and source.prior_views == {}
    g = torch.Generator().manual_seed(0)
    assert [source.draw_items(g, 2) for _ in BEFORE_ITEMS] == BEFORE_ITEMS
    # the latents of a batch against the twin: square crop, flip, resize, encode, sample from the same stream
    items = BEFORE_ITEMS[-1]
    batch = source.make(items, torch.Generator().manual_seed(11))
    pixels = []
    for s, i, v, _ in items:
        images = source.streams[s].images
        var = images.variant(i, v)
        img = images.images[i].crop((var.left, var.top, var.left + var.size, var.top + var.size))
        if var.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((32, 32), Image.Resampling.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    means, stds = zip(*(encode_distribution(comps.vae, p[None]) for p in pixels))
    expected = sample_latents(torch.cat(means), torch.cat(stds), comps.vae.config, torch.Generator().manual_seed(11))
    torch.testing.assert_close(batch.latents, expected, rtol=0, atol=0)


# --- the probe's fixed batch

def test_probe_batch_comes_from_the_largest_bucket_and_is_fixed(tmp_path, comps):
    folder = write_images(tmp_path / "dog", [(200, 100), (100, 200), (220, 100), (64, 64)])
    streams, _ = sd_streams(folder)
    assert streams[0].images.sizes == [(40, 24), (24, 40), (40, 24), (32, 32)]
    assert probe_images(streams[0].images) == [0, 2]
    assert probe_images(ConceptImages(folder, 32)) == [0, 1, 2, 3]  # without buckets: every image, as before
    source = BatchSource(streams, comps, torch.device("cpu"))
    first, again = build_probe_batch(source, seed=0), build_probe_batch(source, seed=0)
    assert first.latents.shape == (4, 4, 24 // comps.vae_scale_factor, 40 // comps.vae_scale_factor)
    for name in ("latents", "noise", "timesteps"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


# --- SDXL's micro-conditioning

def test_sdxl_time_ids_name_the_bucket_and_the_crop_in_the_resized_image(shapes):
    from t2i_fast.sdxl import time_ids

    images = ConceptImages(shapes, 32, buckets=True)
    # wide 200 x 100 -> bucket 40 x 24: resized by 0.24 to 48 x 24, cropped at left (48 - 40) / 2 = 4 (the box's
    # left 16 source pixels, 16 * 40 / 167 = 3.8); (h, w) order throughout, as SDXL's time ids
    assert time_ids(images, 0, 0).tolist() == [100, 200, 0, 4, 24, 40]
    assert time_ids(images, 0, 1).tolist() == [100, 200, 0, 4, 24, 40]  # a flip keeps the crop
    assert time_ids(images, 1, 0).tolist() == [200, 100, 4, 0, 40, 24]
    assert time_ids(images, 2, 0).tolist() == [64, 64, 0, 0, 32, 32]
    crops = ConceptImages(shapes, 32, center_crop=False, crop_variants=2, buckets=True, random_flip=False)
    for k in range(2):
        v = crops.variant(0, k)
        scale = 40 / v.size  # the box is resized to the bucket, so the image by the same factor
        assert time_ids(crops, 0, k).tolist() == [100, 200, round(v.top * 24 / v.height), round(v.left * scale), 24, 40]
        assert 0 <= round(v.left * scale) <= round(200 * scale) - 40


# --- end to end

def test_wide_and_tall_images_train_on_sd1_with_prior_and_probe(shapes, tiny_model, tmp_path):
    from t2i_fast.trainer import Trainer

    classes = write_images(tmp_path / "cls", [(64, 64), (48, 80)], seed=5)
    cfg = TrainConfig(model=str(tiny_model), images=str(shapes), class_word="dog", out=str(tmp_path / "run"),
                      resolution=32, buckets=True, class_images=str(classes), lr=1e-2, max_steps=20,
                      batch_size=2, num_samples=0, progress=False, lora_rank=8, early_stop="dvar", dvar_window=8)
    trainer = Trainer(cfg)
    # the run's own BatchSource releases the VAE and text encoder once they are cached: fixed batches from another
    source = BatchSource(trainer.streams, trainer.comps, trainer.device, trainer.prior, cache_text=True)
    g = torch.Generator().manual_seed(123)
    fixed = {}
    while len(fixed) < 2:  # one fixed batch of the wide bucket and one of the tall
        items = source.draw_items(g, 2)
        size = source.bucket_of(items)
        if size in ((40, 24), (24, 40)):
            fixed.setdefault(size, source.make(items, g))
    with torch.no_grad():
        before = {size: trainer.loss(b).item() for size, b in fixed.items()}
    result = trainer.run()
    with torch.no_grad():
        after = {size: trainer.loss(b).item() for size, b in fixed.items()}
    # the probe ran on its one-bucket batch every step (DVAR may stop the run before the cap)
    assert 8 <= len(result.losses) <= 20 and all(math.isfinite(x) for x in result.losses)
    for size in fixed:
        assert after[size] < before[size] * 0.9, (size, before, after)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from t2i_fast.testing import save_pipeline

    return save_pipeline("sdxl-tiny", tmp_path_factory.mktemp("models") / "sdxl-tiny")


def test_wide_and_tall_images_train_on_sdxl_with_their_time_ids(shapes, sdxl_model, tmp_path, monkeypatch):
    drawn = []
    draw = BatchSource.draw

    def recording(self, generator, batch_size, **kw):
        batch = draw(self, generator, batch_size, **kw)
        drawn.append(batch)
        return batch

    monkeypatch.setattr(BatchSource, "draw", recording)
    cfg = TrainConfig(model=str(sdxl_model), images=str(shapes), class_word="dog", out=str(tmp_path / "run"),
                      resolution=32, buckets=True, max_steps=8, batch_size=2, num_samples=0, progress=False,
                      lora_rank=4, early_stop="none")
    result = train(cfg)
    assert len(drawn) == 8 and all(math.isfinite(x) for x in result.losses)
    expected = {(100, 200): [100, 200, 0, 4, 24, 40], (200, 100): [200, 100, 4, 0, 40, 24],
                (64, 64): [64, 64, 0, 0, 32, 32]}
    seen = set()
    f = load_components(sdxl_model).vae_scale_factor
    for batch in drawn:
        rows = batch.time_ids.tolist()
        (target,) = {tuple(r[4:]) for r in rows}  # one bucket per batch
        assert batch.latents.shape[-2:] == (target[0] // f, target[1] // f)
        for r in rows:
            assert r == expected[tuple(r[:2])], r
        seen.add(target)
    assert {(24, 40), (40, 24)} <= seen, seen
