"""The bundled detection scenes: sizes, counts, boxes, overlaps, splits and determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sasa_jax.data.digit_scenes import digit_scenes


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ih * iw
    return ih * iw / union


SCENES = list(digit_scenes(60, seed=3))


def test_canvases_counts_and_labels():
    sizes = {s["image"].shape[0] for s in SCENES}
    assert min(sizes) >= 96 and max(sizes) <= 128 and len(sizes) > 10
    for s in SCENES:
        h, w, c = s["image"].shape
        assert h == w and c == 3 and s["image"].dtype == np.uint8
        assert 1 <= len(s["boxes"]) == len(s["labels"]) <= 5
        assert s["labels"].min() >= 0 and s["labels"].max() <= 9
    counts = [len(s["boxes"]) for s in SCENES]
    assert min(counts) == 1 and max(counts) == 5
    assert len(set(np.concatenate([s["labels"] for s in SCENES]))) == 10


def test_boxes_are_inside_sized_and_overlap_at_most_0_3():
    sides = []
    for s in SCENES:
        size = s["image"].shape[0]
        b = s["boxes"]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= size).all() and (b[:, 2:] > b[:, :2]).all()
        sides += list(b[:, 2] - b[:, 0])  # a digit's ink spans most of its height
        for x, y in itertools.combinations(b, 2):
            assert _iou(x, y) <= 0.3 + 1e-6
    assert 8 <= min(sides) and max(sides) <= 40 and max(sides) >= 30


def test_the_ink_stands_out_of_the_background():
    """Something is drawn in every box: its brightness spans at least 30% of the range (ink
    is drawn at least 0.4 away from the mean brightness under it)."""
    for s in SCENES[:20]:
        image = s["image"].astype(np.float32)
        for y1, x1, y2, x2 in s["boxes"].astype(int):
            patch = image[y1:y2, x1:x2].mean(-1)
            assert patch.max() - patch.min() > 0.3 * 255


def test_deterministic_per_seed_and_split():
    again = list(digit_scenes(3, seed=3))
    for a, b in zip(again, SCENES[:3], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    other = next(digit_scenes(1, seed=4))["image"]
    test = next(digit_scenes(1, seed=3, test=True))["image"]
    assert not np.array_equal(other, SCENES[0]["image"])
    assert not np.array_equal(test, SCENES[0]["image"])
    with pytest.raises(ValueError, match="count"):
        next(digit_scenes(-1))


def test_backgrounds_vary():
    means = np.array([s["image"].reshape(-1, 3).mean(0) for s in SCENES])
    noise = [np.abs(np.diff(s["image"].astype(float), axis=1)).mean() for s in SCENES]
    assert means.std(0).min() > 20  # colours differ between scenes
    assert max(noise) > 4 * np.median(noise)  # some are noisy, most smooth
