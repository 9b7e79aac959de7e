"""Anchor matching: each anchor takes the ground-truth box it overlaps most.

IoU >= ``positive`` (0.5) makes the anchor a positive for that box's class, IoU <
``negative`` (0.4) a negative (background), anything between is ignored by the class loss.
With ``force_match`` (the TPU RetinaNet's ``force_match_for_each_row``, Detectron's
``allow_low_quality_matches``) each box also claims the anchor it overlaps most, whatever the
IoU, so that no object is left without a positive: small or thin boxes between anchor sizes
and positions often reach no anchor at 0.5 (30% of the bundled digit scenes' boxes).
Static shapes: ground truth comes padded to a fixed count with a validity mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sasa_jax.detection.boxes import pairwise_iou

Array = jax.Array

NEGATIVE = -1  # background: a class-loss target of all zeros
IGNORE = -2  # between the thresholds: no class loss


def match_anchors(
    anchors: Array,
    boxes: Array,
    classes: Array,
    valid: Array,
    *,
    positive: float = 0.5,
    negative: float = 0.4,
    force_match: bool = False,
) -> tuple[Array, Array]:
    """``anchors [N, 4]``, ground truth ``boxes [G, 4]``, ``classes [G]`` int, ``valid [G]``
    bool -> ``(labels [N] int32, matched [N, 4])``.

    ``labels`` is the matched box's class for positives, ``NEGATIVE`` or ``IGNORE``;
    ``matched`` is the box each anchor overlaps most (meaningful for positives only). Ties go
    to the first box. With ``force_match`` each valid box's best anchor (the first of ties) is
    a positive for it, whatever its IoU; an anchor that is the best of several boxes takes the
    first. With no valid box every anchor is negative.
    """
    if not 0.0 <= negative <= positive <= 1.0:
        raise ValueError(
            f"matching needs 0 <= negative <= positive <= 1, got {negative}, {positive}"
        )
    iou = jnp.where(valid[None, :], pairwise_iou(anchors, boxes), -1.0)  # [N, G]
    best = jnp.argmax(iou, axis=1)
    best_iou = jnp.max(iou, axis=1) if boxes.shape[0] else jnp.full(anchors.shape[:1], -1.0)
    labels = jnp.where(
        best_iou >= positive,
        classes[best].astype(jnp.int32) if boxes.shape[0] else NEGATIVE,
        jnp.where(best_iou < negative, NEGATIVE, IGNORE),
    ).astype(jnp.int32)
    matched = boxes[best] if boxes.shape[0] else jnp.zeros_like(anchors)
    if force_match and boxes.shape[0]:
        labels, matched = _force_best_anchors(iou, boxes, classes, valid, labels, matched)
    return labels, matched


def _force_best_anchors(iou, boxes, classes, valid, labels, matched):
    """Each valid box's most-overlapping anchor becomes its positive (static shapes, no
    scatter: ``claims [N, G]`` marks the anchor each box claims)."""
    claims = (jnp.arange(iou.shape[0])[:, None] == jnp.argmax(iou, axis=0)[None, :]) & valid
    claimed = jnp.any(claims, axis=1)
    owner = jnp.argmax(claims, axis=1)  # the first box that claims the anchor
    labels = jnp.where(claimed, classes[owner].astype(jnp.int32), labels)
    matched = jnp.where(claimed[:, None], boxes[owner], matched)
    return labels, matched
