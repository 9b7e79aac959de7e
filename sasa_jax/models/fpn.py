"""The feature pyramid (Lin et al., 2017) on a ResNet's ``c3``..``c5``: P3-P7.

P3-P5: 1x1 laterals, a top-down path (nearest-neighbour upsampling, added), then a "spatial"
layer each; P6: a stride-2 spatial layer on P5 (``p6_from="p5"``) or on C5 (``"c5"``, the
original paper's choice); P7: ReLU then a stride-2 spatial layer on P6. The spatial layer is a
3x3 convolution for conv FPNs and a SASA layer for attention FPNs (the paper's rule: every 3x3
convolution becomes attention).

With ``norm``, a batch norm of its own follows every layer (the laterals, P3-P5, P6, P7): the
input of every SASA layer in the FPN and of the heads' first layer is then normalised. Without
it the lateral sums grow with training and an attention layer's q.k logits with the square of
its input's scale, until each softmax is one-hot and passes no gradient (docs/detection.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.nn import Conv1x1

Array = jax.Array
# spatial(in_features, out_features, *, strides, rngs) -> module: [b,h,w,in] -> [b,h/s,w/s,out]
SpatialFactory = Callable[..., nnx.Module]


def _upsample_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Nearest-neighbour 2x upsampling, cropped to ``shape``'s height and width."""
    y = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return y[:, : shape[1], : shape[2]]


class FPN(nnx.Module):
    """``{"c3","c4","c5"} -> {"p3",...,"p7"}``, each ``[b, h / 2**level, w / 2**level, width]``.

    Args:
      in_features: channels of c3, c4, c5.
      spatial: the spatial-layer factory (see the module docstring).
      width: the pyramid's channels (256 in RetinaNet).
      p6_from: ``"p5"`` or ``"c5"``.
      norm: ``norm(features, rngs=...)`` makes the batch norm after each layer, or None.
    """

    def __init__(
        self,
        in_features: tuple[int, int, int],
        *,
        spatial: SpatialFactory,
        width: int = 256,
        p6_from: str = "p5",
        norm: Callable[..., nnx.Module] | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if p6_from not in ("p5", "c5"):
            raise ValueError(f"p6_from must be 'p5' or 'c5', got {p6_from!r}")
        if len(in_features) != 3:
            raise ValueError(f"FPN takes c3, c4, c5: three channel counts, got {in_features}")
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.p6_from = p6_from
        self.laterals = nnx.List(
            [Conv1x1(c, width, use_bias=True, rngs=rngs, **dtypes) for c in in_features]
        )
        self.outputs = nnx.List([spatial(width, width, strides=1, rngs=rngs) for _ in range(3)])
        p6_in = width if p6_from == "p5" else in_features[2]
        self.p6 = spatial(p6_in, width, strides=2, rngs=rngs)
        self.p7 = spatial(width, width, strides=2, rngs=rngs)
        self.norms = (  # laterals c3-c5, then P3-P7
            nnx.List([norm(width, rngs=rngs) for _ in range(8)]) if norm is not None else None
        )

    def _norm(self, index: int, x: Array) -> Array:
        return x if self.norms is None else self.norms[index](x)

    def __call__(self, features: dict[str, Array]) -> dict[str, Array]:
        c = [features[name] for name in ("c3", "c4", "c5")]
        lateral = [
            self._norm(i, conv(x)) for i, (conv, x) in enumerate(zip(self.laterals, c, strict=True))
        ]
        merged = [lateral[2]]
        for x in (lateral[1], lateral[0]):
            merged.insert(0, x + _upsample_to(merged[0], x.shape))
        pairs = zip(self.outputs, merged, strict=True)
        out = {f"p{i + 3}": self._norm(3 + i, layer(m)) for i, (layer, m) in enumerate(pairs)}
        out["p6"] = self._norm(6, self.p6(out["p5"] if self.p6_from == "p5" else c[2]))
        out["p7"] = self._norm(7, self.p7(jax.nn.relu(out["p6"])))
        return out
