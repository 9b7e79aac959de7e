"""Cluttered digits: a harder bundled classification set, offline like the digits.

The classic test for attention models (cluttered MNIST, Mnih et al. 2014), made from
scikit-learn's 8x8 digits: each image is a 48x48 grey canvas holding one digit, scaled up to
20-34 px at a random position, over ``FRAGMENTS`` clutter fragments -- random 3x3 (source
pixel) patches cut from other digits and scaled like a digit -- with mild pixel noise. The
label is the whole digit's. Train images use the digits that are train images in the
classification set (index % 5 != 0), test images the others, so no digit image (or fragment)
is in both. ``PER_DIGIT`` images are made from each source digit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from sasa_jax.data.sklearn_digits import digits_split

CANVAS = 48
DIGIT_SIZE = (20, 34)
FRAGMENTS = (4, 8)
FRAGMENT_SOURCE = 3  # a fragment is this many source pixels square
NOISE = 0.05
PER_DIGIT = {"train": 4, "test": 4}


def _digits(test: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 8, 8] float in 0..1, labels [n])`` of one split of scikit-learn's digits."""
    return digits_split(test)[1:]


def _scaled(pixels: np.ndarray, size: int) -> np.ndarray:
    """``[h, w]`` floats in 0..1 resized (bilinear) so the longer side is ``size``."""
    h, w = pixels.shape
    shape = (max(1, round(w * size / max(h, w))), max(1, round(h * size / max(h, w))))
    image = Image.fromarray((pixels * 255).astype(np.uint8)).resize(shape, Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _paste(canvas: np.ndarray, glyph: np.ndarray, rng: np.random.Generator) -> None:
    """Draws ``glyph`` at a random position fully inside ``canvas`` (brightest pixel wins)."""
    h, w = glyph.shape
    y, x = rng.integers(0, CANVAS - h + 1), rng.integers(0, CANVAS - w + 1)
    np.maximum(canvas[y : y + h, x : x + w], glyph, out=canvas[y : y + h, x : x + w])


def make_cluttered(rng: np.random.Generator, digit: np.ndarray, others: np.ndarray) -> np.ndarray:
    """One image: ``digit [8, 8]`` in 0..1 over fragments of ``others [m, 8, 8]`` ->
    ``uint8 [48, 48]``."""
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    size = int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1))
    scale = size / 8
    for _ in range(int(rng.integers(FRAGMENTS[0], FRAGMENTS[1] + 1))):
        source = others[rng.integers(len(others))]
        y, x = rng.integers(0, 8 - FRAGMENT_SOURCE + 1, 2)
        patch = source[y : y + FRAGMENT_SOURCE, x : x + FRAGMENT_SOURCE]
        _paste(canvas, _scaled(patch, round(FRAGMENT_SOURCE * scale)), rng)
    _paste(canvas, _scaled(digit, size), rng)
    canvas += rng.normal(0, NOISE, canvas.shape).astype(np.float32)
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def cluttered_digits(split: str, *, seed: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """``(uint8 [48, 48] image, label)`` pairs of ``split`` ("train" or "test"): every source
    digit of the split ``PER_DIGIT[split]`` times, a deterministic function of ``seed``."""
    if split not in PER_DIGIT:
        raise ValueError(f"split must be one of {sorted(PER_DIGIT)}, got {split!r}")
    images, labels = _digits(split == "test")
    rng = np.random.default_rng([seed, int(split == "test")])
    for _ in range(PER_DIGIT[split]):
        for index in range(len(images)):
            others = np.delete(images, index, axis=0)
            yield make_cluttered(rng, images[index], others), int(labels[index])
