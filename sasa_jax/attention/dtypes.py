"""The dtype every implementation computes its softmax in, and the precision of its matmuls."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp


def softmax_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the softmax runs in: float32 for 16-bit inputs, else the input's."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def exact_matmuls(dtype: Any) -> contextlib.AbstractContextManager:
    """Traced inside it, the matmuls of a pass on inputs of ``dtype`` are exact for 32-bit
    (and wider) inputs: precision HIGHEST, where a GPU's default takes TF32 and a TPU's bf16
    passes (on an H200, 3e-3 relative error in the weights). 16-bit inputs keep the backend's
    default. The Pallas kernels choose the same per matmul; every implementation thus returns
    the same numbers on every backend."""
    if jnp.dtype(dtype).itemsize < 4:
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")
