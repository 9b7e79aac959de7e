"""Pooling over non-overlapping blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_jax.attention import maxima

Array = jax.Array


def _blocks(x: Array, block: int) -> Array:
    """``[b, H, W, c] -> [b, H/block, block, W/block, block, c]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // block, block, w // block, block, c)


def _bits(block: int):
    """``[1, 1, block, 1, block, 1]``: each position's place bit in its block."""
    kind = maxima.bits_type(block * block)
    places = np.arange(block * block).reshape(1, 1, block, 1, block, 1)
    return jnp.asarray(maxima.place_bits(places, kind))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _reshape_max(x: Array, block: int) -> Array:
    return _blocks(x, block).max(axis=(2, 4))


def _reshape_max_fwd(x: Array, block: int):
    return _reshape_max(x, block), x


def _reshape_max_bwd(block: int, x: Array, g: Array):
    bits = _bits(block)
    places = jnp.broadcast_to(bits, _blocks(x, block).shape)
    _, held = maxima.block_maxima(_blocks(x, block), places, (2, 4))
    share = (g / jax.lax.population_count(held).astype(g.dtype))[:, :, None, :, None, :]
    winner = (held[:, :, None, :, None, :] & bits) != 0
    return (jnp.where(winner, share, jnp.zeros((), g.dtype)).reshape(x.shape),)


_reshape_max.defvjp(_reshape_max_fwd, _reshape_max_bwd)


def block_max(x: Array, block: int) -> Array:
    """Max pool over non-overlapping ``block x block`` tiles of ``[b, H, W, c]`` (H and W
    multiples of ``block``): ``nnx.max_pool`` with stride = window, lowered per platform. On
    CPU and GPU as a reshape and a max, whose gradient is one elementwise mask: ``max_pool``'s
    goes through a variadic reduce-window over four index planes of the input's size, which
    took ~300 ms of a full-attention ResNet-50 step at 224x224 on a 2-core CPU
    (benchmarks/models.py) and 0.04 GB more of a ResNet-26's step on an H100 (128x128, batch
    8). On TPU ``max_pool`` itself: there the reshape's 6-D gradient is laid out with its
    channels split and padded 8x (0.3 GB more of the same step on a v5e).

    On CPU and GPU the gradient is ``jnp.max``'s (a block's split equally among its maxima),
    with the maxima found by ``attention.maxima`` (blocks of up to 32 positions) rather than
    by comparing values that XLA may have computed twice."""

    def by_reshape(x):
        if block * block > maxima.MAX_PLACES:
            return _blocks(x, block).max(axis=(2, 4))
        return _reshape_max(x, block)

    def by_pool(x):
        return nnx.max_pool(x, (block, block), strides=(block, block))

    return jax.lax.platform_dependent(x, tpu=by_pool, default=by_reshape)


__all__ = ["block_max"]
