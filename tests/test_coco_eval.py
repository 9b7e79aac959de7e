"""The pycocotools wiring: perfect predictions give AP 1, shuffled ones almost 0, and half the
objects found exactly gives COCO's 101-point interpolation of a precision-1, recall-0.5 curve."""

from __future__ import annotations

import numpy as np
import pytest

from sasa_jax.detection.coco_eval import METRICS, coco_metrics, detection_rows


def _ground_truth(seed=0, images=6):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(images):
        n = int(rng.integers(1, 5))
        y, x = rng.uniform(0, 150, (2, n))
        side = rng.choice([20.0, 60.0, 120.0], n)  # small, medium and large (area 32^2, 96^2)
        boxes = np.stack([y, x, y + side, x + side * rng.uniform(0.7, 1.3, n)], -1)
        out.append({"id": 10 + i, "boxes": boxes, "classes": rng.integers(0, 3, n)})
    return out


def _rows(ground_truth, image_of=lambda i: i):
    rows = [
        detection_rows(
            ground_truth[image_of(k)]["id"], g["boxes"], np.ones(len(g["boxes"])), g["classes"]
        )
        for k, g in enumerate(ground_truth)
    ]
    return np.concatenate(rows)


def test_predictions_equal_to_the_ground_truth_give_ap_1():
    gt = _ground_truth()
    metrics = coco_metrics(gt, _rows(gt), num_classes=3)
    assert set(metrics) == set(METRICS)
    for name in METRICS:
        assert metrics[name] == pytest.approx(1.0), name


def test_shuffled_predictions_give_almost_nothing():
    gt = _ground_truth()
    metrics = coco_metrics(gt, _rows(gt, image_of=lambda i: (i + 1) % len(gt)), num_classes=3)
    assert metrics["eval_ap"] < 0.1 and metrics["eval_ap50"] < 0.2


def test_half_the_objects_found_gives_the_interpolated_half():
    gt = [
        {"id": i, "boxes": np.array([[10.0, 10, 70, 80]]), "classes": np.array([0])}
        for i in range(8)
    ]
    found = np.concatenate(
        [detection_rows(i, g["boxes"], [0.9], g["classes"]) for i, g in enumerate(gt[:4])]
    )
    metrics = coco_metrics(gt, found, num_classes=1)
    assert metrics["eval_ap"] == pytest.approx(51 / 101)  # recall thresholds 0, 0.01, ..., 0.5
    assert metrics["eval_ap_small"] == -1.0  # COCO's -1: no small objects at all


def test_no_detections_scores_zero():
    assert coco_metrics(_ground_truth(), np.zeros((0, 7)), num_classes=3) == dict.fromkeys(
        METRICS, 0.0
    )
