"""Image loading (formats, EXIF, modes), augmentation variants, and the exactness of the caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_fast.data import ConceptImages, LatentCache, encode_distribution, list_images, load_image
from t2i_fast.errors import UserError


def test_formats_and_modes(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.jpg")
    Image.fromarray(rgb).save(tmp_path / "c.webp")
    Image.fromarray(rgb).convert("L").save(tmp_path / "d.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "e.png")
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "f.png")
    (tmp_path / "g.txt").write_text("ignored")
    files = list_images(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.jpg", "c.webp", "d.png", "e.png", "f.png"]
    for f in files:
        img = load_image(f)
        assert img.mode == "RGB" and img.size == (30, 20)
    assert load_image(tmp_path / "f.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = np.asarray(load_image(tmp_path / "g16.png"))
    assert img.shape == (64, 64, 3) and (img[..., 0] == img[..., 2]).all()
    np.testing.assert_array_equal(img[..., 0], (ramp >> 8).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 40, 3), np.uint8)  # wide
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: displayed tall
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 40)


def test_variants_and_pixels(concept_dir):
    imgs = ConceptImages(concept_dir, 32, center_crop=False, random_flip=True, crop_variants=3, rescale_variants=2)
    assert imgs.num_variants == 3 * 2 + 2
    px = imgs.pixels(0, 1)
    assert px.shape == (3, 32, 32) and px.min() >= -1 and px.max() <= 1
    flip = [v for v in imgs.variants[0][:6] if v.flip][0]
    plain = imgs.variants[0][imgs.variants[0].index(flip) - 1]
    a, b = imgs.pixels(0, imgs.variants[0].index(plain)), imgs.pixels(0, imgs.variants[0].index(flip))
    torch.testing.assert_close(a.flip(-1), b)
    for v in range(6, 8):
        m = imgs.mask(0, v, 8)
        assert m.shape == (1, 8, 8)
        if imgs.variant(0, v).scale < 1:
            assert 0 <= m.mean() < 1


def test_latent_cache_is_exact(tiny_model, concept_dir):
    from t2i_fast.models import load_components

    comps = load_components(tiny_model)
    imgs = ConceptImages(concept_dir, 32)
    cache = LatentCache(imgs, comps.vae)
    mean, std = encode_distribution(comps.vae, imgs.pixels(1, 1)[None])
    assert torch.equal(cache.get(1, 1)[0], mean[0]) and torch.equal(cache.get(1, 1)[1], std[0])


def test_resolution_must_be_multiple_of_8(concept_dir):
    with pytest.raises(UserError, match="multiple of 8"):
        ConceptImages(concept_dir, 36)
