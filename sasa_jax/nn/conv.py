"""Convolutions of a bottleneck: the 3x3 spatial one, and 1x1 ones applied as matmuls."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def conv3x3(
    in_features: int,
    out_features: int,
    *,
    strides: int = 1,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Conv:
    """The 3x3 convolution of a standard bottleneck (bias-free, SAME)."""
    return nnx.Conv(
        in_features,
        out_features,
        (3, 3),
        strides=strides,
        padding="SAME",
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Conv1x1(nnx.Conv):
    """A 1x1 "SAME" ``nnx.Conv`` (the same parameters) applied as one 2-D matmul.

    XLA's CPU backend runs a 1x1 convolution several times slower than the equivalent
    ``[pixels, in] @ [in, out]`` matmul (benchmarks/models.py). A stride ``s`` reads every
    ``s``-th pixel, as the convolution does. ``[b, h, w, in] -> [b, h/s, w/s, out]``.
    """

    def __init__(self, in_features: int, out_features: int, *, strides: int = 1, **kwargs):
        super().__init__(
            in_features, out_features, (1, 1), strides=strides, padding="SAME", **kwargs
        )
        if self.mask is not None or self.feature_group_count != 1:
            raise ValueError("Conv1x1 takes no mask and no feature groups")

    def __call__(self, x: Array) -> Array:
        x = subsample(x, self.strides)
        kernel = self.kernel[...].reshape(self.in_features, self.out_features)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = jnp.dot(
            x.reshape(-1, self.in_features),
            kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)


def subsample(x: Array, step: int) -> Array:
    """Every ``step``-th pixel of ``[b, h, w, c]`` from the first: ``x[:, ::step, ::step]``,
    as a reshape and an index (XLA's GPU Triton GEMM fusion aborts the process on the strided
    slice feeding a matmul's gradient)."""
    if step == 1:
        return x
    b, h, w, c = x.shape
    x = jnp.pad(x, [(0, 0), (0, -h % step), (0, -w % step), (0, 0)])
    return x.reshape(b, x.shape[1] // step, step, x.shape[2] // step, step, c)[:, :, 0, :, 0]


__all__ = ["Conv1x1", "conv3x3", "subsample"]
