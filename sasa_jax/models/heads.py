"""RetinaNet's class and box heads, shared across pyramid levels.

Each head is ``depth`` (4) spatial layers of ``width`` channels with ReLU, then an output
layer: a 3x3 convolution in conv heads, a pointwise (1x1) one in attention heads (the paper:
"the final layer of the class and box heads is a pointwise convolution"). The class output's
bias starts at ``-log((1 - prior) / prior)`` so every anchor begins at probability ``prior``
(0.01). Attention heads draw their value projections from N(0, 0.01) (the paper's rule).

With ``norm``, each spatial layer is followed by a batch norm of its own per pyramid level
(the layers are shared, the norms are not), as in the TPU RetinaNet whose recipe the paper
trains with. Without it a stack of attention layers whose values start at N(0, 0.01) passes
almost no signal at first, and the heads barely train from scratch.

With ``residual``, each spatial layer adds its input back before the ReLU
(``relu(norm(layer(x)) + x)``; not in RetinaNet or the paper, no parameters; on by default in
attention heads, ``DetectorSpec.head_residual``). A SASA layer whose weights are still near
uniform averages its window, so four stacked ones blur a 12x12 P3 map almost to its mean and
the heads cannot tell one anchor position from the next until they have learned where to
look; a convolution's centre tap keeps each position's own features. The residual keeps them
(docs/attention_at_small_scale.md measures it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.models.projection import sasa_part
from sasa_jax.nn import Conv1x1

Array = jax.Array


def _output_layer(width: int, out: int, pointwise: bool, bias: float, rngs, **dtypes):
    init = dict(bias_init=jax.nn.initializers.constant(bias))
    kernel = dict(kernel_init=jax.nn.initializers.normal(0.01))
    if pointwise:
        return Conv1x1(width, out, use_bias=True, rngs=rngs, **init, **kernel, **dtypes)
    return nnx.Conv(width, out, (3, 3), padding="SAME", rngs=rngs, **init, **kernel, **dtypes)


class Head(nnx.Module):
    """``[b, h, w, width] -> [b, h * w * anchors, outputs_per_anchor]`` for one level."""

    def __init__(
        self,
        width: int,
        anchors: int,
        outputs_per_anchor: int,
        *,
        spatial: Callable[..., nnx.Module],
        pointwise_output: bool,
        depth: int = 4,
        bias: float = 0.0,
        norm: Callable[..., nnx.Module] | None = None,
        residual: bool = False,
        levels: int = 5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if depth < 0 or anchors < 1 or outputs_per_anchor < 1:
            raise ValueError("a head needs depth >= 0, at least one anchor and one output")
        self.outputs_per_anchor, self.residual = outputs_per_anchor, residual
        self.layers = nnx.List([spatial(width, width, strides=1, rngs=rngs) for _ in range(depth)])
        for layer in self.layers:
            sasa = sasa_part(layer)
            if sasa is not None:
                shape = sasa.value.kernel[...].shape
                sasa.value.kernel[...] = 0.01 * jax.random.normal(rngs.params(), shape)
        self.norms = (
            nnx.List(
                [nnx.List([norm(width, rngs=rngs) for _ in range(depth)]) for _ in range(levels)]
            )
            if norm is not None
            else None
        )
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.output = _output_layer(
            width, anchors * outputs_per_anchor, pointwise_output, bias, rngs, **dtypes
        )

    def __call__(self, x: Array, level: int = 0) -> Array:
        """``x``: the features of pyramid level ``level`` (0 for P3: it picks the norms)."""
        for i, layer in enumerate(self.layers):
            y = layer(x)
            y = y if self.norms is None else self.norms[level][i](y)
            x = jax.nn.relu(y + x if self.residual else y)
        y = self.output(x)
        return y.reshape(y.shape[0], -1, self.outputs_per_anchor)


def class_prior_bias(prior: float = 0.01) -> float:
    """The class output's initial bias: sigmoid(bias) == prior."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"the class prior must be in (0, 1), got {prior}")
    return -math.log((1 - prior) / prior)
