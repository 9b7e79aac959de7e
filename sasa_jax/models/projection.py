"""An attention FPN's and heads' SASA layer followed by an output projection: a convention.

The paper turns every 3x3 convolution of the FPN and heads into a SASA layer and says no
more. A SASA layer (eq. 2-3) has Q/K/V projections and no output projection; in the
backbone, the bottleneck's next 1x1 convolution plays that part, but the FPN and heads have
none. ``DetectorSpec.attention_projection`` follows each of their SASA layers with a
bias-free pointwise projection ``W_O`` (``out x out``), as multi-head attention does. It is
the one convention found that brings the fully attentional RetinaNet to Table 2's parameters
and FLOPs (docs/detection.md); it is off by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.nn import Conv1x1
from sasa_jax.nn.attention import SelfAttention2D

Array = jax.Array


class ProjectedAttention(nnx.Module):
    """``attention`` then a bias-free 1x1 ``W_O``: ``[b, h, w, in] -> [b, h/s, w/s, out]``
    (for a strided layer the projection runs after the pooling, on the smaller map)."""

    def __init__(
        self,
        attention: SelfAttention2D,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.attention = attention
        out = attention.out_features
        self.projection = Conv1x1(
            out, out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: Array) -> Array:
        return self.projection(self.attention(x))


def with_projection(attention: Callable[..., SelfAttention2D], **dtypes: Any) -> Callable:
    """A spatial-layer factory (``(in, out, *, strides, rngs)``) of ``attention``'s layers,
    each followed by ``W_O``."""

    def make(in_features: int, out_features: int, *, strides: int, rngs: nnx.Rngs):
        layer = attention(in_features, out_features, strides=strides, rngs=rngs)
        return ProjectedAttention(layer, rngs=rngs, **dtypes)

    return make


def sasa_part(layer: nnx.Module) -> SelfAttention2D | None:
    """The SASA layer of a spatial layer (itself, or a ``ProjectedAttention``'s), or None."""
    if isinstance(layer, ProjectedAttention):
        return layer.attention
    return layer if isinstance(layer, SelfAttention2D) else None
