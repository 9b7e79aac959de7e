"""Exact local attention from shifted windows fused by XLA, with a recomputing backward pass.

``gather`` materialises k² copies of K and V. Here each window offset is one shifted slice of
the zero-padded K (and V), consumed inside the XLA fusion that multiplies it, so no window
copy exists. Per chunk of the batch, the forward pass makes the ``[b, H, W, heads]`` logits of
every offset, an exact softmax over them, and one fused weighted sum of values. It keeps only
the output and the log-sum-exp; the backward pass recomputes the logits (flash-attention
style) and computes ``dk`` and ``dv`` as sums of zero-padded shifts, so nothing is scattered.
On CPU it is the leanest in memory but slower than "tiled": XLA runs it as many small fusions.

Borders: "mask" and "zeros" windows are the same shifts for every query. A "clamp" window is
written as the centred window of extent 2k-1 with the k×k taps of each query kept and the rest
masked; offset ``o`` of that window is row ``o`` of the clamp relative table, so the relative
logits need no index table either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention.api import Implementation, register, softmax_dtype
from sasa_jax.attention.chunks import batch_chunk, map_chunks
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

# Largest logits tensor (elements) one chunk of the batch may make: 2**20 elements is 4 MiB
# in float32, which keeps a chunk's working set in cache and the temp memory small.
CHUNK_ELEMENTS = 2**20


@dataclasses.dataclass(frozen=True)
class AxisOffsets:
    """The distinct shifts (key position minus query position) one axis's windows use.

    Attributes:
      shifts: ``[n]`` int, the shift of each offset; offset ``o`` reads relative-table row ``o``.
      pad_before, pad_after: zero positions to add so every shifted read is in bounds.
      valid: ``[size, n]`` bool, offset ``o`` is a tap of query ``i`` that takes part in the
        softmax (inside the image for "mask", always for "zeros", in the window for "clamp").
      tap_offset: ``[size, window]`` int, the offset index of tap ``t`` of query ``i``.
    """

    shifts: np.ndarray
    pad_before: int
    pad_after: int
    valid: np.ndarray
    tap_offset: np.ndarray


def axis_offsets(win: AxisWindow) -> AxisOffsets:
    """The offsets of one axis's windows; see ``AxisOffsets``."""
    queries = np.arange(win.size)[:, None]
    if win.centred:
        shifts = win.dilation * (np.arange(win.window) - win.window // 2)
        tap_offset = np.broadcast_to(np.arange(win.window), (win.size, win.window))
    else:
        shifts = np.arange(-(win.window - 1), win.window)
        tap_offset = win.position - queries + (win.window - 1)
    member = np.zeros((win.size, len(shifts)), dtype=bool)
    np.put_along_axis(member, tap_offset, True, axis=1)
    valid = member
    if win.border == "mask":
        position = queries + shifts[None, :]
        valid = member & (position >= 0) & (position < win.size)
    return AxisOffsets(
        shifts=shifts,
        pad_before=int(max(0, -shifts.min())),
        pad_after=int(max(0, shifts.max())),
        valid=valid,
        tap_offset=np.ascontiguousarray(tap_offset),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Static tables of a 2-D window over an ``[H, W]`` image (hashed by identity)."""

    height: int
    width: int
    rows: AxisOffsets
    cols: AxisOffsets

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """``(o_r, o_c)`` of every window offset, row-major."""
        return [(r, c) for r in range(len(self.rows.shifts)) for c in range(len(self.cols.shifts))]

    def starts(self, offset: tuple[int, int]) -> tuple[int, int]:
        """Where offset's keys start in the padded key grid."""
        r, c = offset
        return (
            self.rows.pad_before + int(self.rows.shifts[r]),
            self.cols.pad_before + int(self.cols.shifts[c]),
        )

    def bias(self, offset: tuple[int, int]) -> np.ndarray | None:
        """``[H, W, 1]`` 0/-inf logit bias of one offset; None when it is valid everywhere."""
        r, c = offset
        valid = self.rows.valid[:, r, None] & self.cols.valid[None, :, c]
        if valid.all():
            return None
        return np.where(valid, 0.0, -np.inf).astype(np.float32)[:, :, None]


def geometry(rows_win: AxisWindow, cols_win: AxisWindow) -> Geometry:
    """The window tables of an image (cached per geometry)."""
    return _geometry(rows_win.spec, cols_win.spec)


@functools.lru_cache(maxsize=256)
def _geometry(rows_key: tuple, cols_key: tuple) -> Geometry:
    rows_win, cols_win = axis_window(*rows_key), axis_window(*cols_key)
    return Geometry(rows_win.size, cols_win.size, axis_offsets(rows_win), axis_offsets(cols_win))


def _pad(x: Array, geo: Geometry) -> Array:
    """``[b, H, W, ...]`` -> the zero-padded key grid ``[b, H', W', ...]``."""
    pads = [(0, 0), (geo.rows.pad_before, geo.rows.pad_after)]
    pads += [(geo.cols.pad_before, geo.cols.pad_after)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, pads)


def _window(grid: Array, geo: Geometry, offset: tuple[int, int]) -> Array:
    """The keys (or values) every query sees at ``offset``: a shifted ``[b, H, W, ...]`` slice."""
    y, x = geo.starts(offset)
    return grid[:, y : y + geo.height, x : x + geo.width]


def _place(x: Array, geo: Geometry, offset: tuple[int, int]) -> Array:
    """The transpose of ``_window``: puts ``[b, H, W, ...]`` at ``offset`` in a zero key grid."""
    y, x0 = geo.starts(offset)
    full_h = geo.height + geo.rows.pad_before + geo.rows.pad_after
    full_w = geo.width + geo.cols.pad_before + geo.cols.pad_after
    pads = [(0, 0), (y, full_h - y - geo.height), (x0, full_w - x0 - geo.width)]
    return jnp.pad(x, pads + [(0, 0)] * (x.ndim - 3))


def _unpad(grid: Array, geo: Geometry) -> Array:
    y, x = geo.rows.pad_before, geo.cols.pad_before
    return grid[:, y : y + geo.height, x : x + geo.width]


def _dot(a: Array, b: Array, dtype) -> Array:
    """``sum_i a[..., i] * b[..., i]`` as explicit products, so XLA fuses it with its operands."""
    terms = [a[..., i].astype(dtype) * b[..., i].astype(dtype) for i in range(a.shape[-1])]
    return functools.reduce(jnp.add, terms)


def _total(terms: list[Array]) -> Array:
    return functools.reduce(jnp.add, terms)


def _matmul(a: Array, b: Array, dtype) -> Array:
    """``a [..., m] @ b [m, n]`` as one 2-D matmul (XLA's CPU dot is fastest on 2-D)."""
    flat = jnp.dot(a.reshape(-1, a.shape[-1]), b, preferred_element_type=dtype)
    return flat.reshape(*a.shape[:-1], b.shape[-1])


def _rel_logits(q: Array, rel: tuple[Array, ...], dtype) -> tuple[Array, Array] | None:
    """``q·r_row`` ``[b, H, W, h, n_r]`` and ``q·r_col`` ``[b, H, W, h, n_c]``, or None."""
    if not rel:
        return None
    half = q.shape[-1] // 2
    return _matmul(q[..., :half], rel[0].T, dtype), _matmul(q[..., half:], rel[1].T, dtype)


def _logits(q, k_grid, rel_logits, geo: Geometry, dtype) -> list[Array]:
    """The ``[b, H, W, h]`` logits of every offset (-inf where the offset is masked)."""
    result = []
    for offset in geo.offsets:
        logit = _dot(q, _window(k_grid, geo, offset), dtype)
        if rel_logits is not None:
            logit = logit + rel_logits[0][..., offset[0]] + rel_logits[1][..., offset[1]]
        bias = geo.bias(offset)
        if bias is not None:
            logit = logit + jnp.asarray(bias, dtype)
        result.append(logit)
    return result


def _forward_chunk(q, k, v, rel, geo: Geometry, with_weights: bool):
    """``q, k: [b, H, W, h, d]``, ``v: [b, H, W, h, dv]`` -> out, weights (or None), lse."""
    dtype = softmax_dtype(q.dtype)
    logits = _logits(q, _pad(k, geo), _rel_logits(q, rel, dtype), geo, dtype)
    top = functools.reduce(jnp.maximum, logits)
    exps = [jnp.exp(logit - top) for logit in logits]
    total = _total(exps)
    v_grid = _pad(v, geo)
    acc = jnp.promote_types(v.dtype, dtype)
    pairs = zip(exps, geo.offsets, strict=True)
    weighted = _total([e[..., None] * _window(v_grid, geo, o).astype(acc) for e, o in pairs])
    out = (weighted / total[..., None]).astype(v.dtype)
    weights = jnp.stack([e / total for e in exps], axis=-1) if with_weights else None
    return out, weights, top + jnp.log(total)


def _backward_chunk(q, k, v, rel, out, lse, d_out, d_weights, geo: Geometry):
    """One chunk's ``(dq, dk, dv, d_rel)`` from the saved output and log-sum-exp."""
    dtype = softmax_dtype(q.dtype)
    k_grid, v_grid = _pad(k, geo), _pad(v, geo)
    rel_logits = _rel_logits(q, rel, dtype)
    probs = [jnp.exp(x - lse) for x in _logits(q, k_grid, rel_logits, geo, dtype)]
    d_probs = [_dot(d_out, _window(v_grid, geo, o), dtype) for o in geo.offsets]
    delta = _dot(d_out, out, dtype)
    if d_weights is not None:
        d_weights = d_weights.astype(dtype)
        d_probs = [d + d_weights[..., j] for j, d in enumerate(d_probs)]
        delta = delta + _total([p * d_weights[..., j] for j, p in enumerate(probs)])
    d_logits = [p * (d - delta) for p, d in zip(probs, d_probs, strict=True)]
    pairs, prob_pairs = (
        list(zip(d_logits, geo.offsets, strict=True)),
        list(zip(probs, geo.offsets, strict=True)),
    )
    dq = _total([g[..., None] * _window(k_grid, geo, o).astype(dtype) for g, o in pairs])
    q_wide, d_out_wide = q.astype(dtype), d_out.astype(dtype)
    dk = _total([_place(g[..., None] * q_wide, geo, o) for g, o in pairs])
    dv = _total([_place(p[..., None] * d_out_wide, geo, o) for p, o in prob_pairs])
    d_rel = ()
    if rel:
        dq, d_rel = _rel_backward(q, rel, d_logits, dq, geo, dtype)
    return (
        dq.astype(q.dtype),
        _unpad(dk, geo).astype(k.dtype),
        _unpad(dv, geo).astype(v.dtype),
        d_rel,
    )


def _rel_backward(q, rel, d_logits, dq, geo: Geometry, dtype):
    """Adds the relative term's share to ``dq``; returns it and the tables' gradients."""
    n_r, n_c = len(geo.rows.shifts), len(geo.cols.shifts)
    by_row = jnp.stack([_total(d_logits[r * n_c : (r + 1) * n_c]) for r in range(n_r)], -1)
    by_col = jnp.stack([_total(d_logits[c::n_c]) for c in range(n_c)], -1)
    half = q.shape[-1] // 2
    rel_row, rel_col = rel
    dq_row = _matmul(by_row, rel_row.astype(dtype), dtype)
    dq_col = _matmul(by_col, rel_col.astype(dtype), dtype)
    dq = dq + jnp.concatenate([dq_row, dq_col], axis=-1)

    def table_grad(by_offset, q_half, table):
        a = by_offset.reshape(-1, by_offset.shape[-1])
        return jnp.dot(a.T, q_half.reshape(-1, half).astype(dtype)).astype(table.dtype)

    d_row = table_grad(by_row, q[..., :half], rel_row)
    return dq, (d_row, table_grad(by_col, q[..., half:], rel_col))


# At most this many chunks are unrolled into straight-line code; more run in a lax.map loop.
MAX_UNROLLED_CHUNKS = 16


def _chunked(fn, arrays, chunk: int):
    """``map_chunks`` with this module's unrolling bound (read at call time)."""
    return map_chunks(fn, arrays, chunk, max_unrolled=MAX_UNROLLED_CHUNKS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, rel, geo: Geometry, chunk: int, with_weights: bool):
    out, weights, _ = _forward(q, k, v, rel, geo, chunk, with_weights)
    return (out, weights) if with_weights else out


def _forward(q, k, v, rel, geo, chunk, with_weights):
    return _chunked(
        lambda q, k, v: _forward_chunk(q, k, v, rel, geo, with_weights), (q, k, v), chunk
    )


def _attend_fwd(q, k, v, rel, geo, chunk, with_weights):
    out, weights, lse = _forward(q, k, v, rel, geo, chunk, with_weights)
    result = (out, weights) if with_weights else out
    return result, (q, k, v, rel, out, lse)


def _attend_bwd(geo, chunk, with_weights, residuals, cotangent):
    q, k, v, rel, out, lse = residuals
    d_out, d_weights = cotangent if with_weights else (cotangent, None)

    def run(q, k, v, out, lse, d_out, d_weights):
        grads = _backward_chunk(q, k, v, rel, out, lse, d_out, d_weights, geo)
        return grads[:3], grads[3]

    (dq, dk, dv), d_rel = _chunked_sum(run, (q, k, v, out, lse, d_out, d_weights), chunk)
    return dq, dk, dv, d_rel


def _chunked_sum(fn, arrays, chunk: int):
    """Like ``_chunked`` for ``fn -> (per_example, summed)``: concatenates the first part and
    adds up the second (the relative tables' gradients) over the chunks."""

    def with_chunk_axis(*xs):
        per_example, summed = fn(*xs)
        return per_example, jax.tree.map(lambda s: s[None], summed)

    per_example, summed = _chunked(with_chunk_axis, arrays, chunk)
    return per_example, jax.tree.map(lambda s: jnp.sum(s, axis=0), summed)


_attend.defvjp(_attend_fwd, _attend_bwd)


def fused_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` by fused shifted windows; arguments are already checked."""
    geo = geometry(rows, cols)
    b, height, width, heads, _ = q.shape
    rel = () if rel_row is None else (rel_row, rel_col)
    chunk = batch_chunk(b, height * width * heads * len(geo.offsets), CHUNK_ELEMENTS)
    result = _attend(q, k, v, rel, geo, chunk, return_weights)
    if not return_weights:
        return result
    out, weights = result
    return out, _tap_weights(weights, geo)


def _tap_weights(weights: Array, geo: Geometry) -> Array:
    """``[b, H, W, h, T]`` offset weights -> ``[b, H, W, h, kh*kw]`` in row-major tap order."""
    rows, cols = geo.rows.tap_offset, geo.cols.tap_offset
    taps = rows[:, None, :, None] * len(geo.cols.shifts) + cols[None, :, None, :]
    taps = taps.reshape(geo.height, geo.width, 1, -1)
    return jnp.take_along_axis(weights, jnp.asarray(taps)[None], axis=-1)


register(Implementation("fused", fused_attention))

__all__ = ["CHUNK_ELEMENTS", "axis_offsets", "fused_attention", "geometry"]
