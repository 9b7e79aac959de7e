"""Pooling over non-overlapping blocks."""

from __future__ import annotations

import jax
from flax import nnx

Array = jax.Array


def block_max(x: Array, block: int) -> Array:
    """Max pool over non-overlapping ``block x block`` tiles of ``[b, H, W, c]`` (H and W
    multiples of ``block``): ``nnx.max_pool`` with stride = window, lowered per platform. On
    CPU and GPU as a reshape and a max, whose gradient is one elementwise mask: ``max_pool``'s
    goes through a variadic reduce-window over four index planes of the input's size, which
    took ~300 ms of a full-attention ResNet-50 step at 224x224 on a 2-core CPU
    (benchmarks/models.py) and 0.04 GB more of a ResNet-26's step on an H100 (128x128, batch
    8). On TPU ``max_pool`` itself: there the reshape's 6-D gradient is laid out with its
    channels split and padded 8x (0.3 GB more of the same step on a v5e)."""

    def by_reshape(x):
        b, h, w, c = x.shape
        return x.reshape(b, h // block, block, w // block, block, c).max(axis=(2, 4))

    def by_pool(x):
        return nnx.max_pool(x, (block, block), strides=(block, block))

    return jax.lax.platform_dependent(x, tpu=by_pool, default=by_reshape)


__all__ = ["block_max"]
