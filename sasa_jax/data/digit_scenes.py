"""The bundled offline detection set: scikit-learn's digits placed on larger canvases.

Each scene is a square canvas of 96-128 px with 1-5 digits of 12-40 px at random positions
(their boxes overlap with IoU at most 0.3) over one of several backgrounds: a two-colour
gradient, low-frequency colour blobs, or a gradient under strong pixel noise. A digit is
drawn as ink of a random colour far from the background's under it; its box is the tight box
of its ink. Train scenes use the digits that are train images in the classification set
(index % 5 != 0), test scenes the others, so no digit image is in both.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from sasa_jax.data.sklearn_digits import digits_split

CANVAS = (96, 128)
COUNT = (1, 5)
SIZE = (12, 40)
MAX_IOU = 0.3
INK = 0.25  # alpha above which a pixel counts as the digit's ink, for its box


def _digits(test: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 8, 8] float in 0..1, labels [n])`` of one split of scikit-learn's digits."""
    return digits_split(test)[1:]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[size, size, 3]`` float in 0..1, one of three kinds."""
    kind = rng.integers(3)
    if kind == 1:  # colour blobs: 4x4 random colours, smoothly upsampled
        small = (rng.uniform(0, 255, (4, 4, 3))).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)) / 255.0
    a, b = rng.uniform(0, 1, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0, 1)
    image = a + (b - a) * t[..., None]
    if kind == 2:  # under strong noise
        image = image + rng.normal(0, 0.12, image.shape)
    return np.clip(image, 0, 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _ink_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour whose brightness is at least 0.4 away from ``under``'s mean."""
    mean = float(under.mean())
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        if abs(colour.mean() - mean) >= 0.4:
            return colour
    return np.full(3, 1.0 if mean < 0.5 else 0.0)


def _place(rng, canvas, glyph, boxes) -> np.ndarray | None:
    """Draws ``glyph`` (alpha, ``[s, s]``) somewhere its ink box overlaps no box in ``boxes``
    by more than ``MAX_IOU``; returns the box, or None after 30 tries."""
    s, size = glyph.shape[0], canvas.shape[0]
    rows, cols = np.nonzero(glyph > INK)
    for _ in range(30):
        y, x = rng.integers(0, size - s + 1, 2)
        box = np.array([y + rows.min(), x + cols.min(), y + rows.max() + 1, x + cols.max() + 1])
        if all(_iou(box, other) <= MAX_IOU for other in boxes):
            region = canvas[y : y + s, x : x + s]
            colour = _ink_colour(rng, region)
            alpha = glyph[..., None]
            canvas[y : y + s, x : x + s] = region * (1 - alpha) + colour * alpha
            return box.astype(np.float32)
    return None


def make_scene(rng: np.random.Generator, test: bool = False) -> dict[str, np.ndarray]:
    """One scene: ``{"image": uint8 [S, S, 3], "boxes": float32 [n, 4] (y1, x1, y2, x2)
    pixels, "labels": int64 [n]}`` with ``S`` in 96..128 and ``n`` in 1..5."""
    images, labels = _digits(test)
    size = int(rng.integers(CANVAS[0], CANVAS[1] + 1))
    canvas = _background(rng, size)
    boxes, classes = [], []
    for _ in range(int(rng.integers(COUNT[0], COUNT[1] + 1))):
        index = int(rng.integers(len(images)))
        s = int(rng.integers(SIZE[0], SIZE[1] + 1))
        glyph = (
            np.asarray(
                Image.fromarray((images[index] * 255).astype(np.uint8)).resize(
                    (s, s), Image.BILINEAR
                )
            )
            / 255.0
        )
        box = _place(rng, canvas, glyph, boxes)
        if box is not None:
            boxes.append(box)
            classes.append(int(labels[index]))
    return {
        "image": np.round(canvas * 255).astype(np.uint8),
        "boxes": np.stack(boxes).astype(np.float32),
        "labels": np.asarray(classes, np.int64),
    }


def digit_scenes(count: int, *, test: bool = False, seed: int = 0) -> Iterator[dict]:
    """``count`` scenes of one split, a deterministic function of ``seed``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng([seed, int(test)])
    for _ in range(count):
        yield make_scene(rng, test)
