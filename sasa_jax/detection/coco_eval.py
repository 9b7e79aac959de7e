"""COCO box metrics through pycocotools, from arrays the eval loop gathers.

Ground truth and detections are per image, in the original image's pixels, boxes
``(y1, x1, y2, x2)``; classes are 0-based (COCO ids are class + 1 here). Images without objects
count: their detections are false positives.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

METRICS = ("eval_ap", "eval_ap50", "eval_ap75", "eval_ap_small", "eval_ap_medium", "eval_ap_large")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack(
        [boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], -1
    )


def ground_truth_dataset(images: list[dict], num_classes: int) -> dict:
    """A COCO-format dataset from ``images``: dicts with ``id``, ``boxes [n, 4]``,
    ``classes [n]``, and optionally ``crowd [n]`` and ``area [n]``."""
    annotations = []
    for image in images:
        boxes = _xywh(image["boxes"])
        n = len(boxes)
        crowd = np.asarray(image.get("crowd", np.zeros(n)), bool)
        area = image.get("area")
        area = boxes[:, 2] * boxes[:, 3] if area is None else np.asarray(area, np.float64)
        for k in range(n):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image["id"]),
                    "category_id": int(image["classes"][k]) + 1,
                    "bbox": [float(v) for v in boxes[k]],
                    "area": float(area[k]),
                    "iscrowd": int(crowd[k]),
                }
            )
    return {
        "images": [{"id": int(image["id"])} for image in images],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }


def detection_rows(image_id: int, boxes, scores, classes) -> np.ndarray:
    """``[n, 7]`` rows ``(image_id, x, y, w, h, score, category_id)`` for ``loadRes``."""
    xywh = _xywh(boxes)
    n = len(xywh)
    return np.concatenate(
        [
            np.full((n, 1), image_id, np.float64),
            xywh,
            np.asarray(scores, np.float64).reshape(n, 1),
            np.asarray(classes, np.float64).reshape(n, 1) + 1,
        ],
        -1,
    )


def coco_metrics(ground_truth: list[dict], detections: np.ndarray, num_classes: int) -> dict:
    """AP, AP50, AP75 and AP for small / medium / large objects, as fractions (COCO's -1
    where no ground-truth object has that size), keyed as ``METRICS``.

    ``detections``: ``[n, 7]`` rows from ``detection_rows`` for all images.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) == 0:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth_dataset(ground_truth, num_classes)
        gt.createIndex()
        dt = gt.loadRes(np.asarray(detections, np.float64))
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats[:6], strict=True)}
