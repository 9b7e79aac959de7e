"""The reference implementation: pad, cut the windows with ``jax.lax`` slices, vmap over heads.

It materialises every key and value window (k² copies of K and V), so it is simple and slow.
It builds on slices rather than ``conv_general_dilated_patches``, whose gradient is ~40x slower
on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sasa_jax.attention.dtypes import exact_matmuls, softmax_dtype
from sasa_jax.attention.registry import Implementation, register
from sasa_jax.attention.windows import AxisWindow

Array = jax.Array


def windows_along(x: Array, axis: int, win: AxisWindow) -> Array:
    """Inserts a tap axis after ``axis``: ``[..., size, ...] -> [..., size, window, ...]``.

    Entry ``[..., i, t, ...]`` is ``x`` at position ``win.position[i, t]`` along ``axis``, or
    zero where that position lies outside the image.
    """
    if win.centred:
        pads = [(0, 0)] * x.ndim
        pads[axis] = (win.pad_before, win.pad_after)
        padded = jnp.pad(x, pads)
        taps = [
            jax.lax.slice_in_dim(padded, win.dilation * t, win.dilation * t + win.size, axis=axis)
            for t in range(win.window)
        ]
        return jnp.stack(taps, axis=axis + 1)
    # Clamped windows: cut the size-window+1 distinct windows, then pick each query's.
    num_starts = win.size - win.window + 1
    taps = [jax.lax.slice_in_dim(x, t, t + num_starts, axis=axis) for t in range(win.window)]
    return jnp.take(jnp.stack(taps, axis=axis + 1), jnp.asarray(win.start), axis=axis)


def relative_logits(
    q_half: Array, table: Array, win: AxisWindow, axis: int, dtype: jnp.dtype
) -> Array:
    """``q_half · table[rel_index]`` per query and tap, ``[b, h, w, window]``.

    ``axis`` is 1 for rows and 2 for columns of ``q_half`` (``[b, h, w, dim/2]``).
    """
    per_offset = jnp.einsum(
        "bhwd,rd->bhwr", q_half, table.astype(q_half.dtype), preferred_element_type=dtype
    )
    if win.centred:  # rel_index[i, t] == t for every query.
        return per_offset
    shape = [1, 1, 1, win.window]
    shape[axis] = win.size
    index = jnp.asarray(win.rel_index.reshape(shape))
    return jnp.take_along_axis(per_offset, index, axis=-1, mode="clip")


def _one_head(q, k, v, rel_row, rel_col, *, rows: AxisWindow, cols: AxisWindow):
    """``q, k: [b, h, w, d]`` (``k`` may be None), ``v: [b, h, w, dv]`` ->
    ``([b, h, w, dv], [b, h, w, kh*kw])``."""
    dtype = softmax_dtype(q.dtype)
    v_win = windows_along(windows_along(v, 1, rows), 3, cols)  # [b, h, kh, w, kw, dv]
    if k is None:
        logits = jnp.zeros((*q.shape[:3], rows.window, cols.window), dtype)
    else:
        k_win = windows_along(windows_along(k, 1, rows), 3, cols)  # [b, h, kh, w, kw, d]
        logits = jnp.einsum("bhwd,bhtwud->bhwtu", q, k_win, preferred_element_type=dtype)
    if rel_row is not None:
        half = q.shape[-1] // 2
        logits = logits + relative_logits(q[..., :half], rel_row, rows, 1, dtype)[..., :, None]
        logits = logits + relative_logits(q[..., half:], rel_col, cols, 2, dtype)[..., None, :]
    member = rows.member[:, None, :, None] & cols.member[None, :, None, :]
    if not member.all():
        logits = jnp.where(jnp.asarray(member), logits, -jnp.inf)
    b, h, w, kh, kw = logits.shape
    weights = jax.nn.softmax(logits.reshape(b, h, w, kh * kw), axis=-1)
    out = jnp.einsum(
        "bhwtu,bhtwud->bhwd",
        weights.reshape(logits.shape).astype(v.dtype),
        v_win,
        preferred_element_type=jnp.promote_types(v.dtype, dtype),
    )
    return out.astype(v.dtype), weights


def gather_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` by explicit windows; arguments are already checked."""
    per_head = functools.partial(_one_head, rows=rows, cols=cols)
    with exact_matmuls(q.dtype):
        out, weights = jax.vmap(per_head, in_axes=(3, 3, 3, None, None), out_axes=3)(
            q, k, v, rel_row, rel_col
        )
    return (out, weights) if return_weights else out


register(Implementation("gather", gather_attention))

__all__ = ["gather_attention", "relative_logits", "windows_along"]
