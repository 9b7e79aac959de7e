"""From the heads' outputs to detections, with static shapes (it runs inside jit).

Per image: decode every anchor's box, clip it to the image, then per class keep the
``pre_nms`` highest scores above ``score_threshold``, suppress overlaps (IoU > 0.5), and keep
the ``max_detections`` best over all classes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sasa_jax.detection.boxes import decode
from sasa_jax.detection.nms import non_max_suppression

Array = jax.Array


def _per_class(boxes, scores, pre_nms, per_class, iou_threshold):
    """One class: ``(boxes [per_class, 4], scores [per_class])``, -inf scores for padding."""
    top_scores, top = jax.lax.top_k(scores, pre_nms)
    kept, valid = non_max_suppression(
        boxes[top], top_scores, per_class, iou_threshold=iou_threshold
    )
    return boxes[top][kept], jnp.where(valid, top_scores[kept], -jnp.inf)


def detect(
    logits: Array,
    deltas: Array,
    anchors: Array,
    image_size: tuple[int, int],
    *,
    score_threshold: float = 0.05,
    pre_nms: int = 1000,
    max_detections: int = 100,
    iou_threshold: float = 0.5,
) -> dict[str, Array]:
    """``logits [b, N, C]``, ``deltas [b, N, 4]``, ``anchors [N, 4]`` -> ``{"boxes": [b, K, 4]
    (y1, x1, y2, x2 in input pixels), "scores": [b, K], "classes": [b, K] int32, "valid":
    [b, K] bool}`` with ``K = max_detections``, by decreasing score."""
    if min(pre_nms, max_detections) <= 0:
        raise ValueError("pre_nms and max_detections must be positive")
    n = logits.shape[1]
    pre_nms = min(pre_nms, n)
    limit = jnp.asarray([image_size[0], image_size[1]] * 2, jnp.float32)

    def one(logits, deltas):
        boxes = jnp.clip(decode(deltas, anchors), 0.0, limit)
        scores = jax.nn.sigmoid(logits.astype(jnp.float32))
        scores = jnp.where(scores > score_threshold, scores, -jnp.inf)  # [N, C]
        per_class = functools.partial(
            _per_class, pre_nms=pre_nms, per_class=max_detections, iou_threshold=iou_threshold
        )
        kept_boxes, kept_scores = jax.vmap(per_class, in_axes=(None, 1))(boxes, scores)
        flat_scores = kept_scores.reshape(-1)  # [C * K]
        best_scores, best = jax.lax.top_k(flat_scores, max_detections)
        return {
            "boxes": kept_boxes.reshape(-1, 4)[best],
            "scores": jnp.where(best_scores > -jnp.inf, best_scores, 0.0),
            "classes": (best // max_detections).astype(jnp.int32),
            "valid": best_scores > -jnp.inf,
        }

    return jax.vmap(one)(logits, deltas)
