"""Each block's max and the places that hold it, for max pools' gradients.

``jnp.max``'s gradient finds a block's maxima by comparing the block's values with its max
again. Where XLA computes those values twice (fused into the max and into the comparison)
with other rounding, the comparison can miss the max: seen on CPU with
``--xla_backend_optimization_level=0``, where the stem's norm-bias gradient came out 1.75 off
its reference (``tests/test_pool_gradients.py``).
Here one reduction over (value, places) pairs, a bit per place of the block, gives the max and
its places together; the gradient then tells the places apart by their bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_PLACES = 32  # bits of the widest place mask


def bits_type(places: int):
    """The unsigned integer type with a bit for each of ``places`` places (at most 32)."""
    if places > MAX_PLACES:
        raise ValueError(f"at most {MAX_PLACES} places in a block, got {places}")
    return jnp.uint16 if places <= 16 else jnp.uint32


def place_bits(places: np.ndarray, kind) -> np.ndarray:
    """``1 << place`` of each place (``-1``: no place, no bit), as ``kind``."""
    return np.where(places >= 0, 1 << np.maximum(places, 0), 0).astype(kind)


def _max_and_places(a, b):
    """Of two (value, places) pairs the larger value with its places; of equal values, the
    places of both."""
    (va, ma), (vb, mb) = a, b
    return jnp.maximum(va, vb), jnp.where(vb > va, mb, jnp.where(va > vb, ma, ma | mb))


def block_maxima(values: Array, bits: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """The max of ``values`` over ``axes`` and the bits of the places that hold it: ``bits``
    (broadcast like ``values``) gives each element's place bit."""
    init = (jnp.asarray(-jnp.inf, values.dtype), jnp.asarray(0, bits.dtype))
    return jax.lax.reduce((values, bits), init, _max_and_places, axes)


__all__ = ["MAX_PLACES", "bits_type", "block_maxima", "place_bits"]
