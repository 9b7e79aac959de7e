"""Host preprocessing: crop sampling, decoding, crop-and-resize, flip, and their semantics.

References are independent of the code under test: Pillow's decoder and bilinear resize, the
analytic distributions of the Inception crop, and hand-made images whose answer is known.
"""

from __future__ import annotations

import io
import math

import chex
import numpy as np
import pytest
from PIL import Image

from sasa_jax import data
from sasa_jax.data.preprocess import (
    _decode,
    _header_size,
    centre_crop,
    crop_and_resize,
    sample_crop,
)


def _encoded(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (a bicubic upsampling of 6x6 noise)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


# ------------------------------------------------------------------------ crop sampling


def test_inception_crops_respect_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = sample_crop(500, 375, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def _ks(samples: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between ``samples`` and a continuous ``cdf``."""
    x = np.sort(samples)
    n = len(x)
    f = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def test_inception_crop_area_is_uniform_and_ratio_log_uniform():
    """Where every sampled box fits, the area fraction is U(a, b) and log(w/h) is
    U(log r0, log r1): the Inception crop's distributions, up to integer rounding."""
    rng = np.random.default_rng(1)
    boxes = np.array(
        [sample_crop(2000, 2000, rng, (0.08, 0.5), (3 / 4, 4 / 3)) for _ in range(3000)]
    )
    area = boxes[:, 2] * boxes[:, 3] / 2000**2
    log_ratio = np.log(boxes[:, 2] / boxes[:, 3])
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert _ks(area, lambda x: np.clip((x - 0.08) / 0.42, 0, 1)) < 0.035
    assert _ks(log_ratio, lambda x: np.clip((x - lo) / (hi - lo), 0, 1)) < 0.035
    # Positions are uniform over the free range: the box centres average the image centre.
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    np.testing.assert_allclose(centres.mean(0), 1000, atol=15)


def test_inception_crop_falls_back_to_a_centre_crop():
    rng = np.random.default_rng(0)
    # No box of ratio within [3/4, 4/3] and area >= 50% fits a 1000x10 image.
    assert sample_crop(1000, 10, rng, (0.5, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)
    assert centre_crop(300, 200, 0.875) == (62, 12, 175, 175)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "mode, options",
    [
        ("RGB", {}),
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"exif": Image.Exif()}),
    ],
)
def test_jpeg_header_size_matches_pillow(mode, options):
    image = Image.new(mode, (37, 23))
    encoded = _encoded(image, "JPEG", **options)
    assert _header_size(encoded) == Image.open(io.BytesIO(encoded)).size == (37, 23)


def test_header_size_is_none_for_other_formats():
    assert _header_size(_encoded(np.zeros((4, 5, 3), np.uint8), "PNG")) is None
    assert _header_size(b"\xff\xd8\xff") is None  # truncated


COLOUR = (200, 40, 90)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("L", "PNG"),
        ("I;16", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "GIF"),
        ("RGB", "BMP"),
    ],
)
def test_every_colour_layout_decodes_to_pillows_rgb(mode, fmt):
    """Whatever the format and colour layout, the pixels are Pillow's ``convert("RGB")``."""
    image = Image.new("RGB", (48, 40), COLOUR)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)  # undithered
    elif mode == "I;16":
        image = Image.new("I;16", (48, 40), 30000)
    else:
        image = image.convert(mode)
    encoded = _encoded(image, fmt)
    expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))[20, 24]
    if mode == "I;16":  # Pillow's RGB of 16-bit is clipped; OpenCV scales to 8 bits
        expected = np.full(3, 30000 >> 8)
    out = data.eval_image(encoded, 16, crop_fraction=1.0)
    chex.assert_shape(out, (16, 16, 3))
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), expected, atol=3)


def test_reduced_jpeg_decode_matches_a_full_decode():
    """A large JPEG decoded at 1/2-1/8 scale in the DCT domain matches a full decode."""
    y, x = np.mgrid[0:1600, 0:1200]
    image = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((300, 400))).repeat(4, 0).repeat(4, 1)
    encoded = _encoded(image, "JPEG")
    augment = data.TrainAugment(size=64, area_range=(0.9, 1.0), flip=False)
    fast = data.train_image(encoded, np.random.default_rng(3), augment)
    slow = data.train_image(
        np.asarray(Image.open(io.BytesIO(encoded))), np.random.default_rng(3), augment
    )
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4


@pytest.mark.parametrize(
    "crop, expected_shape", [(1200, (150, 200)), (300, (300, 400)), (127, (1200, 1600))]
)
def test_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_crop(crop, expected_shape):
    """A 1600x1200 JPEG and a 64-px output: a 1200-px crop decodes at 1/8 (150 px), a 300-px
    crop at 1/4 (75 px; 1/8 would leave 37), a 127-px crop at full size (1/2 would leave 63)."""
    encoded = _encoded(_smooth(1200, 1600), "JPEG")
    pixels, box, size = _decode(encoded, lambda w, h: (0, 0, crop, crop), 64)
    assert pixels.shape[:2] == expected_shape
    assert box == (0, 0, crop, crop) and size == (1600, 1200)


# ------------------------------------------------------------------ crop and resize


@pytest.mark.parametrize("box, size", [((30, 20, 40, 30), 64), ((10, 5, 90, 80), 72)])
def test_crop_and_resize_matches_pillow_bilinear(box, size):
    """Upsampling and a mild downscale agree with Pillow's bilinear resize of the same box
    (both centre pixels at +0.5; Pillow's widens its kernel when shrinking, OpenCV's not)."""
    image = _smooth(100, 120)
    ours = crop_and_resize(_encoded(image), lambda w, h: box, size)
    left, top, w, h = box
    pillow = Image.fromarray(image).resize(
        (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)
    )
    diff = np.abs(ours.astype(int) - np.asarray(pillow).astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 6


def test_crop_takes_exactly_the_box():
    image = np.zeros((60, 80, 3), np.uint8)
    image[10:40, 20:50] = (255, 0, 0)  # a red 30x30 square inside black
    out = crop_and_resize(image, lambda w, h: (20, 10, 30, 30), 24)
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([255, 0, 0], np.uint8), out.shape))


def test_resize_saturates_instead_of_wrapping():
    """A black/white edge stays within [0, 255] on both sides; nothing wraps around."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 255
    out = crop_and_resize(_encoded(image), lambda w, h: (0, 0, 16, 16), 64)
    assert out.dtype == np.uint8
    assert out[:, :24].max() <= 5 and out[:, 40:].min() >= 250


def test_flip_mirrors_about_half_the_time():
    image = _smooth(50, 50, seed=4)
    augment = data.TrainAugment(size=32, area_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    plain = crop_and_resize(image, lambda w, h: (0, 0, 50, 50), 32)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(200):
        out = data.train_image(_encoded(image), rng, augment)
        if np.array_equal(out, plain[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)
    assert 70 <= flips <= 130  # Binomial(200, 0.5): outside this in < 1e-4 of seeds


def test_translate_moves_whole_pixels_uniformly_without_resampling():
    """One white pixel on black lands, unchanged, at every offset within the limit, and the
    vacated pixels are black."""
    image = np.zeros((21, 21, 3), np.uint8)
    image[10, 10] = 255
    augment = data.TrainAugment(
        size=21, area_range=(1.0, 1.0), ratio_range=(1.0, 1.0), flip=False, translate=2
    )
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(400):
        out = data.train_image(_encoded(image), rng, augment)
        ((row, col),) = np.argwhere(out[..., 0] == 255)
        assert out.sum() == 3 * 255  # one pixel, all three channels, nothing blurred
        offsets.append((row - 10, col - 10))
    assert set(offsets) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_translate_fills_the_vacated_edge_with_black():
    image = np.full((8, 8, 3), 200, np.uint8)
    out = data.preprocess.translate(image, (-3, 2))  # up 3, right 2
    assert (out[5:] == 0).all() and (out[:, :2] == 0).all()
    assert (out[:5, 2:] == 200).all()


def test_translate_comes_from_the_config():
    from sasa_jax.train import config as config_lib

    config = config_lib.default_config()
    assert data.augment_from_config(config).translate == 0
    config.translate_pixels = 3
    assert data.augment_from_config(config).translate == 3


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_crop_is_the_centre(fmt):
    image = np.zeros((200, 300, 3), np.uint8)
    image[:, 150:] = 255  # right half white
    out = data.eval_image(_encoded(image, fmt), 64, crop_fraction=0.875)
    chex.assert_shape(out, (64, 64, 3))
    assert out.dtype == np.uint8
    assert out[:, :20].max() < 40 and out[:, -20:].min() > 215  # centred: half dark, half light


def test_normalize():
    images = np.array([[[[0, 128, 255]]]], np.uint8)
    expected = (np.array([0, 128, 255]) / 255 - np.array(data.preprocess.IMAGENET_MEAN)) / np.array(
        data.preprocess.IMAGENET_STD
    )
    np.testing.assert_allclose(data.normalize(images)[0, 0, 0], expected, rtol=1e-6)
