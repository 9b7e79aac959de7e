"""Greedy non-maximum suppression with static shapes, so it runs inside jit on a device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sasa_jax.detection.boxes import pairwise_iou

Array = jax.Array


def non_max_suppression(
    boxes: Array, scores: Array, max_outputs: int, *, iou_threshold: float = 0.5
) -> tuple[Array, Array]:
    """``boxes [N, 4]``, ``scores [N]`` -> ``(indices [max_outputs] int32, valid [max_outputs])``.

    Boxes are visited by decreasing score (ties: lower index first); one is kept unless it
    overlaps a kept box with IoU > ``iou_threshold``. Scores of ``-inf`` are never kept.
    ``indices`` lists the kept boxes by decreasing score, padded with 0 where ``valid`` is
    False. Cost: an ``[N, N]`` IoU matrix, so take a per-class top-k first for large N.
    """
    if max_outputs <= 0:
        raise ValueError(f"max_outputs must be positive, got {max_outputs}")
    n = boxes.shape[0]
    order = jnp.argsort(-scores, stable=True)
    sorted_boxes, sorted_scores = boxes[order], scores[order]
    overlaps = pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold

    def visit(i, keep):
        suppressed = jnp.any(overlaps[i] & keep)  # only earlier boxes are kept yet
        return keep.at[i].set(~suppressed & (sorted_scores[i] > -jnp.inf))

    keep = jax.lax.fori_loop(0, n, visit, jnp.zeros(n, bool))
    # Kept positions first, in score order: a stable sort on "not kept".
    ranked = jnp.argsort(~keep, stable=True)[:max_outputs]
    if ranked.shape[0] < max_outputs:
        ranked = jnp.pad(ranked, (0, max_outputs - ranked.shape[0]))
    valid = keep[ranked] & (jnp.arange(max_outputs) < n)
    return jnp.where(valid, order[ranked], 0).astype(jnp.int32), valid
