"""Detection as a task of the shared trainer (``sasa_jax.tasks``): RetinaNet, its loss, and
COCO metrics over the whole eval split.

The detector comes from ``config.model`` (the backbone) and ``config.detection`` (see
``train.config.detection_config``); anchors are fixed by ``config.image_size`` (square inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_jax import data
from sasa_jax.detection.anchors import AnchorSpec, anchor_boxes
from sasa_jax.detection.coco_eval import coco_metrics, detection_rows
from sasa_jax.detection.postprocess import detect
from sasa_jax.detection.targets import assign_targets, detection_loss
from sasa_jax.models import ModelSpec
from sasa_jax.models.retinanet import DetectorSpec, RetinaNet
from sasa_jax.nn import BatchNorm
from sasa_jax.tasks.base import compute_dtype, normalized_images


def detector_spec(config, num_classes: int) -> DetectorSpec:
    """The RetinaNet ``config`` describes, for ``num_classes`` classes."""
    det = config.detection
    return DetectorSpec(
        backbone=ModelSpec.from_config(config.model, num_classes=0),
        heads=det.heads,
        fpn=det.get("fpn", ""),
        num_classes=num_classes,
        width=det.fpn_width,
        head_depth=det.head_depth,
        p6_from=det.p6_from,
        head_norm=det.head_norm,
        fpn_norm=det.get("fpn_norm", "attention"),
        attention_projection=det.get("attention_projection", False),
        head_residual=det.get("head_residual", "attention"),
        anchors=AnchorSpec(size=det.anchor_size),
    )


def check_detection_config(config) -> None:
    """One ValueError for detection settings that cannot run, before anything compiles."""
    det = config.detection
    detector_spec(config, 1)
    if config.image_size % 32:
        raise ValueError(
            f"config.image_size ({config.image_size}) must be a multiple of 32 for detection "
            "(the backbone's stride)"
        )
    if det.max_boxes < 1:
        raise ValueError(f"config.detection.max_boxes must be >= 1, got {det.max_boxes}")
    if not 0 < det.scale_min <= det.scale_max:
        raise ValueError(
            f"config.detection.scale_min/scale_max must satisfy 0 < min <= max, got "
            f"{det.scale_min}, {det.scale_max}"
        )


@dataclasses.dataclass(frozen=True)
class DetectionTask:
    """RetinaNet on square ``config.image_size`` inputs; eval writes COCO AP metrics."""

    config: Any
    num_classes: int

    @property
    def anchors(self) -> np.ndarray:
        size = self.config.image_size
        return anchor_boxes((size, size), AnchorSpec(size=self.config.detection.anchor_size))

    def create_model(self, seed: int) -> nnx.Module:
        spec = detector_spec(self.config, self.num_classes)
        dtype = compute_dtype(self.config)
        return RetinaNet(spec, rngs=nnx.Rngs(seed), dtype=dtype, batch_norm=BatchNorm)

    def inputs(self, batch: dict) -> jax.Array:
        """The batch's images, normalised, in the compute dtype: the model's input."""
        return normalized_images(self.config, batch)

    def loss(self, model, images, batch):
        logits, deltas = model(images)
        labels, targets = assign_targets(
            jnp.asarray(self.anchors),
            batch["boxes"],
            batch["classes"],
            batch["valid"],
            force_match=self.config.detection.get("force_match", False),
        )
        loss, parts = detection_loss(
            logits, deltas, labels, targets, box_weight=self.config.detection.box_weight
        )
        return loss, {
            "class_loss": parts["class_loss"],
            "box_loss": parts["box_loss"],
            "positives": parts["positives"].astype(jnp.float32) / images.shape[0],
        }

    def predict(self, model, images) -> dict:
        """Detections in input pixels: ``boxes [b, K, 4]``, ``scores``, ``classes``, ``valid``."""
        det = self.config.detection
        logits, deltas = model(images)
        size = self.config.image_size
        return detect(
            logits,
            deltas,
            jnp.asarray(self.anchors),
            (size, size),
            score_threshold=det.score_threshold,
            pre_nms=det.pre_nms,
            max_detections=det.max_detections,
            iou_threshold=det.nms_iou,
        )

    def eval_outputs(self, model, images, batch) -> dict:
        """The batch's detections (in original pixels) beside its ground truth."""
        found = self.predict(model, images)
        scale = batch["scale"][:, None, None]
        keys = ("index", "mask", "gt_boxes", "gt_classes", "gt_crowd", "gt_area", "gt_valid")
        return {
            **{k: batch[k] for k in keys},
            "boxes": found["boxes"] / scale,
            "scores": found["scores"],
            "classes": found["classes"],
            "valid": found["valid"],
        }

    def augment(self) -> data.DetectionAugment:
        det = self.config.detection
        return data.DetectionAugment(
            size=self.config.image_size,
            max_boxes=det.max_boxes,
            scale_range=(det.scale_min, det.scale_max),
            flip=self.config.random_flip,
        )

    def eval_example(self) -> data.DetectionEval:
        return data.DetectionEval(self.config.image_size, self.config.detection.max_boxes)

    def summarize(self, outputs: Iterable[dict]) -> dict[str, float]:
        ground_truth, rows = [], []
        for out in outputs:
            out = {k: np.asarray(v) for k, v in out.items()}
            for i in np.flatnonzero(out["mask"]):
                real = out["gt_valid"][i]
                ground_truth.append(
                    {
                        "id": int(out["index"][i]),
                        "boxes": out["gt_boxes"][i][real],
                        "classes": out["gt_classes"][i][real],
                        "crowd": out["gt_crowd"][i][real],
                        "area": out["gt_area"][i][real],
                    }
                )
                kept = out["valid"][i]
                rows.append(
                    detection_rows(
                        int(out["index"][i]),
                        out["boxes"][i][kept],
                        out["scores"][i][kept],
                        out["classes"][i][kept],
                    )
                )
        detections = np.concatenate(rows) if rows else np.zeros((0, 7))
        metrics = coco_metrics(ground_truth, detections, self.num_classes)
        return {**metrics, "eval_examples": len(ground_truth)}

    def describe(self, results: dict[str, float]) -> str:
        return (
            f"AP {results['eval_ap']:.4f}, AP50 {results['eval_ap50']:.4f}, "
            f"AP75 {results['eval_ap75']:.4f}"
        )
