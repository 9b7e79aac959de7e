"""Training targets and the detection loss for a batch: match, encode, focal + box loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sasa_jax.detection.boxes import encode
from sasa_jax.detection.losses import box_loss, focal_loss
from sasa_jax.detection.matching import match_anchors

Array = jax.Array


def assign_targets(
    anchors: Array, boxes: Array, classes: Array, valid: Array, *, force_match: bool = False
) -> tuple[Array, Array]:
    """Per image of a batch: ``anchors [N, 4]``, ``boxes [b, G, 4]``, ``classes [b, G]``,
    ``valid [b, G]`` -> ``(labels [b, N] int32, box targets [b, N, 4])`` (targets are
    meaningful where ``labels >= 0``); ``force_match`` as in ``match_anchors``."""

    def one(boxes, classes, valid):
        labels, matched = match_anchors(anchors, boxes, classes, valid, force_match=force_match)
        return labels, encode(matched, anchors)

    return jax.vmap(one)(boxes, classes, valid)


def detection_loss(
    logits: Array,
    deltas: Array,
    labels: Array,
    targets: Array,
    *,
    box_weight: float = 50.0,
) -> tuple[Array, dict[str, Array]]:
    """RetinaNet's loss over a batch: the focal loss plus ``box_weight`` times the Huber box
    loss (50 with Huber's delta 0.1, as the TPU RetinaNet), both divided by the number of
    positive anchors (at least 1). Returns ``(loss, {"class_loss", "box_loss",
    "positives"})``."""
    positives = jnp.sum(labels >= 0)
    norm = jnp.maximum(positives, 1).astype(jnp.float32)
    class_loss = focal_loss(logits, labels, logits.shape[-1]) / norm
    regression = box_loss(deltas, targets, labels) / norm
    loss = class_loss + box_weight * regression
    return loss, {"class_loss": class_loss, "box_loss": regression, "positives": positives}
