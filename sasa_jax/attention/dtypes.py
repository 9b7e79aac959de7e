"""The dtype every implementation computes its softmax in."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def softmax_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the softmax runs in: float32 for 16-bit inputs, else the input's."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype
