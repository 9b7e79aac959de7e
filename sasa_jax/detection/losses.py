"""RetinaNet's losses: sigmoid focal loss for the classes, Huber loss for the boxes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sasa_jax.detection.matching import IGNORE

Array = jax.Array


def focal_loss(
    logits: Array, labels: Array, num_classes: int, *, alpha: float = 0.25, gamma: float = 2.0
) -> Array:
    """Sum over anchors and classes of the sigmoid focal loss (Lin et al., 2017), ignored
    anchors left out. ``logits [..., N, C]``, ``labels [..., N]`` from ``match_anchors``
    (a class, ``NEGATIVE`` or ``IGNORE``). Divide by the number of positives yourself."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # negatives: all zero
    x = logits.astype(jnp.float32)
    p = jax.nn.sigmoid(x)
    cross_entropy = jnp.maximum(x, 0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = targets * p + (1 - targets) * (1 - p)
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    loss = alpha_t * (1 - p_t) ** gamma * cross_entropy
    keep = (labels != IGNORE)[..., None]
    return jnp.sum(jnp.where(keep, loss, 0.0))


def box_loss(deltas: Array, targets: Array, labels: Array, *, delta: float = 0.1) -> Array:
    """Sum of the Huber loss (quadratic below ``delta``) of the predicted ``deltas [..., N, 4]``
    against the ``targets`` over positive anchors (``labels >= 0``)."""
    diff = jnp.abs(deltas.astype(jnp.float32) - targets)
    huber = jnp.where(diff < delta, 0.5 * diff**2, delta * (diff - 0.5 * delta))
    return jnp.sum(jnp.where((labels >= 0)[..., None], huber, 0.0))
