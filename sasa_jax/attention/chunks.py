"""Splitting an implementation's batch into chunks, to bound its temp memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def batch_chunk(batch: int, per_image: int, max_elements: int) -> int:
    """The largest divisor of ``batch`` whose ``chunk * per_image`` fits in ``max_elements``
    (at least 1)."""
    fits = [c for c in range(1, batch + 1) if batch % c == 0 and c * per_image <= max_elements]
    return max(fits, default=1)


def map_chunks(fn: Callable, arrays: Sequence, chunk: int, *, max_unrolled: int):
    """Applies ``fn`` to chunks of the batch (leading) axis of ``arrays`` (None entries pass
    through) and concatenates its outputs.

    Up to ``max_unrolled`` chunks become straight-line code; more run in a ``lax.map`` loop,
    which keeps one chunk alive at a time (XLA schedules unrolled chunks side by side).
    """
    batch = arrays[0].shape[0]
    if chunk >= batch:
        return fn(*arrays)
    count = batch // chunk
    if count <= max_unrolled:
        pieces = [
            fn(*[None if a is None else a[i * chunk : (i + 1) * chunk] for a in arrays])
            for i in range(count)
        ]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    split = [None if a is None else a.reshape(count, chunk, *a.shape[1:]) for a in arrays]
    stacked = jax.lax.map(lambda xs: fn(*xs), tuple(split))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), stacked)
