"""Exact local attention as masked dense attention: for small feature maps.

Every query attends to every key of the (zero-padded, for border "zeros") image through two
batched matmuls; a static membership table masks the keys outside its window and picks the
relative-table row of those inside. It does (H'·W')/(kh·kw) times the useful work, so it only
pays off where the window covers much of the map (the 7×7 stage of a ResNet at 224², or
CIFAR-sized inputs), where matmuls beat everything else on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention.api import Implementation, register, softmax_dtype
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTable:
    """For one axis: which key position each query's tap reads, and the dense tables.

    Attributes:
      pad: zero positions added on each side (border "zeros" only) for the virtual zero keys.
      keys: number of key positions along the axis (``size + 2 * pad``).
      rel: ``[size, keys]`` int, the relative-table row of key ``K`` for query ``i``, or -1
        when ``K`` is not in the query's window.
      tap_key: ``[size, window]`` int, the key position of tap ``t`` of query ``i``.
      tap_valid: ``[size, window]`` bool, the tap is a real key (False: outside the image
        under border "mask", weight 0).
    """

    pad: int
    keys: int
    rel: np.ndarray
    tap_key: np.ndarray
    tap_valid: np.ndarray


def axis_table(win: AxisWindow) -> AxisTable:
    """The dense membership table of one axis; see ``AxisTable``."""
    pad = max(win.pad_before, win.pad_after) if win.border == "zeros" else 0
    keys = win.size + 2 * pad
    rel = np.full((win.size, keys), -1, dtype=np.int32)
    tap_key = win.position + pad
    inside = (tap_key >= 0) & (tap_key < keys)
    for i in range(win.size):
        rel[i, tap_key[i][inside[i]]] = win.rel_index[i][inside[i]]
    return AxisTable(pad, keys, rel, np.clip(tap_key, 0, keys - 1).astype(np.int32), inside)


@functools.lru_cache(maxsize=256)
def _tables(rows_key: tuple, cols_key: tuple) -> tuple[AxisTable, AxisTable]:
    return axis_table(axis_window(*rows_key)), axis_table(axis_window(*cols_key))


def tables(rows: AxisWindow, cols: AxisWindow) -> tuple[AxisTable, AxisTable]:
    """The row and column tables (cached per geometry)."""

    def key(win: AxisWindow) -> tuple:
        return (win.size, win.window, win.dilation, win.border)

    return _tables(key(rows), key(cols))


def _relative(q_half: Array, table: Array, rel: np.ndarray, axis: int, dtype) -> Array:
    """``q_half · table[rel[query, key]]`` per query and key position along ``axis`` (1 for
    rows, 2 for columns): ``[b, H, W, h, keys]``; 0 where ``rel`` is -1 (masked anyway)."""
    per_row = jnp.einsum(
        "bywhd,rd->bywhr", q_half, table.astype(q_half.dtype), preferred_element_type=dtype
    )
    index = (
        np.maximum(rel, 0)[None, :, None, None, :]
        if axis == 1
        else (np.maximum(rel, 0)[None, None, :, None, :])
    )
    return jnp.take_along_axis(per_row, jnp.asarray(index), axis=-1)


# Largest logits tensor (elements) one chunk of the batch may make; each chunk is
# rematerialised in the backward pass, so only one chunk's logits are alive at a time.
CHUNK_ELEMENTS = 2**19


def dense_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` as masked dense attention; arguments are already checked."""
    row_t, col_t = tables(rows, cols)
    b, height, width, heads, _ = q.shape
    per_image = heads * height * width * row_t.keys * col_t.keys
    chunk = max(
        [c for c in range(1, b + 1) if b % c == 0 and c * per_image <= CHUNK_ELEMENTS], default=1
    )
    attend = functools.partial(
        _attend,
        rel_row=rel_row,
        rel_col=rel_col,
        row_t=row_t,
        col_t=col_t,
        return_weights=return_weights,
    )
    if chunk == b:
        return attend(q, k, v)
    attend = jax.checkpoint(attend)
    pieces = [attend(*(x[i : i + chunk] for x in (q, k, v))) for i in range(0, b, chunk)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)


def _attend(q, k, v, *, rel_row, rel_col, row_t, col_t, return_weights):
    b, height, width, heads, dim = q.shape
    dtype = softmax_dtype(q.dtype)
    pads = ((0, 0), (row_t.pad, row_t.pad), (col_t.pad, col_t.pad), (0, 0), (0, 0))
    k_all = jnp.pad(k, pads).reshape(b, row_t.keys * col_t.keys, heads, dim)
    v_all = jnp.pad(v, pads).reshape(b, row_t.keys * col_t.keys, heads, v.shape[-1])
    q_flat = q.reshape(b, height * width, heads, dim)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q_flat, k_all, preferred_element_type=dtype)
    logits = logits.reshape(b, heads, height, width, row_t.keys, col_t.keys)
    if rel_row is not None:
        half = dim // 2
        by_row = _relative(q[..., :half], rel_row, row_t.rel, 1, dtype)  # [b, H, W, h, H']
        by_col = _relative(q[..., half:], rel_col, col_t.rel, 2, dtype)  # [b, H, W, h, W']
        rel_logits = by_row[..., :, None] + by_col[..., None, :]
        logits = logits + jnp.moveaxis(rel_logits, 3, 1)
    member = (row_t.rel >= 0)[:, None, :, None] & (col_t.rel >= 0)[None, :, None, :]
    logits = jnp.where(jnp.asarray(member), logits, -jnp.inf)
    shape = logits.shape
    weights = jax.nn.softmax(logits.reshape(b, heads, height * width, -1), axis=-1)
    out = jnp.einsum(
        "bhnm,bmhd->bnhd",
        weights.astype(v.dtype),
        v_all,
        preferred_element_type=jnp.promote_types(v.dtype, dtype),
    )
    out = out.reshape(b, height, width, heads, v.shape[-1]).astype(v.dtype)
    if not return_weights:
        return out
    return out, _tap_weights(weights.reshape(shape), row_t, col_t)


def _tap_weights(weights: Array, row_t: AxisTable, col_t: AxisTable) -> Array:
    """``[b, h, H, W, H', W']`` -> ``[b, H, W, h, kh*kw]`` at each query's taps (0 if masked)."""
    b, heads, height, width = weights.shape[:4]
    ys = row_t.tap_key[:, None, :, None]
    xs = col_t.tap_key[None, :, None, :]
    flat = (ys * col_t.keys + xs).reshape(height, width, -1)
    grid = weights.reshape(b, heads, height, width, -1)
    picked = jnp.take_along_axis(grid, jnp.asarray(flat)[None, None], axis=-1)
    valid = row_t.tap_valid[:, None, :, None] & col_t.tap_valid[None, :, None, :]
    picked = jnp.where(jnp.asarray(valid.reshape(height, width, -1)), picked, 0)
    return jnp.moveaxis(picked, 1, 3)


register(Implementation("dense", dense_attention))

__all__ = ["axis_table", "dense_attention", "tables"]
