"""Per-example preprocessing for detection, on the host (NumPy, OpenCV, Pillow; no TensorFlow).

A detection record holds ``image`` (encoded bytes or ``uint8 [h, w, 3]``) and ``objects``:
``bbox`` ``[n, 4]`` (y1, x1, y2, x2) as fractions of the image (TFDS's ``BBoxFeature``),
``label`` ``[n]``, and optionally ``is_crowd`` and ``area`` (COCO's). Examples leave with static
shapes: the image ``uint8 [size, size, 3]`` and ``max_boxes`` padded boxes in the output's
pixels, with ``valid`` marking the real ones.

* Training (``DetectionAugment``): multiscale jitter -- the image is resized so its longer side
  is ``size`` times a random factor in ``scale_range`` -- then a random ``size x size`` crop
  (zero padding where the image is smaller), then a random horizontal flip. Boxes follow;
  boxes cut to less than ``min_visible`` of their area, and crowd boxes, are dropped.
* Eval (``DetectionEval``): the longer side resized to ``size``, padded at the bottom and
  right; the ground truth stays in the original image's pixels, beside the ``scale`` that maps
  the input's pixels back to them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from sasa_jax.data.preprocess import decode_rgb

Example = dict[str, np.ndarray]


def record_boxes(record: dict, height: int, width: int) -> dict[str, np.ndarray]:
    """A record's objects in pixels: ``boxes [n, 4]`` (y1, x1, y2, x2), ``classes [n]``,
    ``crowd [n]`` bool and ``area [n]`` (COCO's segment area when the record has one)."""
    objects = record["objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    boxes = boxes * np.asarray([height, width, height, width], np.float32)
    n = len(boxes)
    crowd = np.asarray(objects.get("is_crowd", np.zeros(n)), bool).reshape(n)
    area = objects.get("area")
    if area is None:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {
        "boxes": boxes,
        "classes": np.asarray(objects["label"], np.int32).reshape(n),
        "crowd": crowd,
        "area": np.asarray(area, np.float32).reshape(n),
    }


def pad_rows(values: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """The first ``rows`` rows of ``values``, padded with ``fill`` to exactly ``rows``."""
    out = np.full((rows, *values.shape[1:]), fill, values.dtype)
    out[: min(rows, len(values))] = values[:rows]
    return out


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _paste(image: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    """The ``size x size`` window of ``image`` at ``(top, left)``, zeros outside the image."""
    out = np.zeros((size, size, 3), np.uint8)
    part = image[top : top + size, left : left + size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


@dataclasses.dataclass(frozen=True)
class DetectionAugment:
    """Training preprocessing for detection (see the module docstring).

    Attributes:
      size: output side.
      max_boxes: boxes per example after padding (extra boxes are dropped).
      scale_range: the multiscale jitter's factor range (1.0, 1.0 turns it off).
      flip: random horizontal flip.
      min_visible: the fraction of a box's area that must stay inside the crop.
    """

    size: int
    max_boxes: int = 100
    scale_range: tuple[float, float] = (0.8, 1.2)
    flip: bool = True
    min_visible: float = 0.3

    def example(self, record: dict, rng: np.random.Generator) -> Example:
        """``{"image": uint8 [size, size, 3], "boxes": float32 [max_boxes, 4], "classes":
        int32 [max_boxes], "valid": bool [max_boxes]}``."""
        image = decode_rgb(record["image"])
        h, w = image.shape[:2]
        gt = record_boxes(record, h, w)
        scale = self.size / max(h, w) * rng.uniform(*self.scale_range)
        image = _resize(image, scale)
        top = int(rng.integers(0, max(image.shape[0] - self.size, 0) + 1))
        left = int(rng.integers(0, max(image.shape[1] - self.size, 0) + 1))
        image = _paste(image, self.size, top, left)
        boxes = gt["boxes"] * scale - np.asarray([top, left, top, left], np.float32)
        clipped = np.clip(boxes, 0, self.size)
        keep = ~gt["crowd"] & (_box_area(clipped) >= self.min_visible * _box_area(boxes))
        keep &= _box_area(clipped) > 0
        boxes, classes = clipped[keep], gt["classes"][keep]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            boxes = np.stack(
                [boxes[:, 0], self.size - boxes[:, 3], boxes[:, 2], self.size - boxes[:, 1]], -1
            )
        return {
            "image": np.ascontiguousarray(image),
            "boxes": pad_rows(boxes.astype(np.float32), self.max_boxes),
            "classes": pad_rows(classes, self.max_boxes),
            "valid": pad_rows(np.ones(len(boxes), bool), self.max_boxes, False),
        }

    def empty(self) -> Example:
        """An example of the training batch's shapes and dtypes (zeros, no valid box)."""
        m = self.max_boxes
        return {
            "image": np.zeros((self.size, self.size, 3), np.uint8),
            "boxes": np.zeros((m, 4), np.float32),
            "classes": np.zeros((m,), np.int32),
            "valid": np.zeros((m,), bool),
        }


@dataclasses.dataclass(frozen=True)
class DetectionEval:
    """Eval preprocessing: resize the longer side to ``size``, pad to a square.

    Examples are ``{"image": uint8 [size, size, 3], "scale": float32 (input pixels per
    original pixel), "index": int32 (the record's position), "mask": bool, and the ground
    truth in original pixels: "gt_boxes" [max_boxes, 4], "gt_classes", "gt_crowd",
    "gt_area", "gt_valid"}``.
    """

    size: int
    max_boxes: int = 100

    def __call__(self, index: int, record: dict) -> Example:
        image = decode_rgb(record["image"])
        h, w = image.shape[:2]
        gt = record_boxes(record, h, w)
        if len(gt["boxes"]) > self.max_boxes:
            raise ValueError(
                f"an eval image has {len(gt['boxes'])} objects, more than max_boxes="
                f"{self.max_boxes}; raise config.max_boxes so eval sees every object"
            )
        scale = self.size / max(h, w)
        return {
            "image": _paste(_resize(image, scale), self.size, 0, 0),
            "scale": np.float32(scale),
            "index": np.int32(index),
            "mask": np.bool_(True),
            "gt_boxes": pad_rows(gt["boxes"], self.max_boxes),
            "gt_classes": pad_rows(gt["classes"], self.max_boxes),
            "gt_crowd": pad_rows(gt["crowd"], self.max_boxes, False),
            "gt_area": pad_rows(gt["area"], self.max_boxes),
            "gt_valid": pad_rows(np.ones(len(gt["boxes"]), bool), self.max_boxes, False),
        }

    def empty(self) -> Example:
        """A padding example: zeros, ``mask`` False."""
        m = self.max_boxes
        return {
            "image": np.zeros((self.size, self.size, 3), np.uint8),
            "scale": np.float32(1.0),
            "index": np.int32(-1),
            "mask": np.bool_(False),
            "gt_boxes": np.zeros((m, 4), np.float32),
            "gt_classes": np.zeros((m,), np.int32),
            "gt_crowd": np.zeros((m,), bool),
            "gt_area": np.zeros((m,), np.float32),
            "gt_valid": np.zeros((m,), bool),
        }
