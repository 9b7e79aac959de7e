"""Boxes ``(y1, x1, y2, x2)``: pairwise IoU and the anchor-relative regression targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# log(1000 / 16): the largest width or height change decode allows (as Detectron does), so
# an untrained head's large outputs cannot overflow exp().
MAX_LOG_SCALE = 4.135166556742356


def _areas(boxes: Array) -> Array:
    return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) * jnp.maximum(
        boxes[..., 3] - boxes[..., 1], 0
    )


def pairwise_iou(a: Array, b: Array) -> Array:
    """``[n, 4], [m, 4] -> [n, m]`` intersection over union; 0 where both areas are 0."""
    top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.maximum(bottom_right - top_left, 0), axis=-1)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def _centre_form(boxes: Array) -> tuple[Array, Array, Array, Array]:
    h, w = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + h / 2, boxes[..., 1] + w / 2, h, w


def encode(boxes: Array, anchors: Array) -> Array:
    """``[..., 4]`` targets ``(dy, dx, dh, dw)`` of ``boxes`` relative to ``anchors`` (same
    shape): centre offsets in anchor sizes, log size ratios (the Faster R-CNN coding, without
    scale factors, as RetinaNet)."""
    by, bx, bh, bw = _centre_form(boxes)
    ay, ax, ah, aw = _centre_form(anchors)
    tiny = 1e-8
    bh, bw = jnp.maximum(bh, tiny), jnp.maximum(bw, tiny)
    return jnp.stack([(by - ay) / ah, (bx - ax) / aw, jnp.log(bh / ah), jnp.log(bw / aw)], axis=-1)


def decode(deltas: Array, anchors: Array) -> Array:
    """The inverse of ``encode``: ``[..., 4]`` boxes from targets and anchors; size changes are
    clipped at ``exp(MAX_LOG_SCALE)``."""
    ay, ax, ah, aw = _centre_form(anchors)
    cy, cx = deltas[..., 0] * ah + ay, deltas[..., 1] * aw + ax
    h = jnp.exp(jnp.minimum(deltas[..., 2], MAX_LOG_SCALE)) * ah
    w = jnp.exp(jnp.minimum(deltas[..., 3], MAX_LOG_SCALE)) * aw
    return jnp.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)
