"""Exact local attention as masked dense attention over tiles: "dense" and "tiled".

The map is cut into tiles of queries. Each tile attends to every key of its halo (the tile
grown by the window's reach) through two batched matmuls; static per-axis tables mask the halo
keys outside each query's window and pick the relative-table row of those inside. This is
HaloNet's blocking made exact for every border. The mask is a finite ``MASKED`` logit term
(-1e30), whose exponential is exactly 0 as -inf's is, so that it can go through a matmul.

- "dense": one tile covers the whole map. It does (H'·W')/(kh·kw) times the useful work, so
  it pays off on small maps (the 7×7 and 14×14 stages of a ResNet at 224²).
- "tiled": square query tiles of ``tiles.TILE`` with a halo, (TILE+k-1)²/TILE² times the
  useful work on large maps.

The work runs in a loop over the steps of ``tiles.plan``: whole images, or some rows of tiles
of one image, or some heads of one row of tiles, up to ``step_elements()`` logits, so on CPU a
step's logits stay in cache; a step gathers its query tiles and key halos from the unpadded
arrays. The forward pass keeps only the output and the log-sum-exp. The backward pass (the
op's primitive's, ``dispatch``) loops over the same steps once, recomputing the logits
flash-attention style: ``dq`` and the relative tables' gradients come from the query side,
and ``dk`` and ``dv`` per key halo, added up where halos overlap as sums of shifted slices, so
they are never scattered.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention import tiles
from sasa_jax.attention.dtypes import exact_matmuls, softmax_dtype
from sasa_jax.attention.registry import Implementation, Kernel, register
from sasa_jax.attention.tiles import MASKED, AxisTiles, Plan, plan, tap_keys
from sasa_jax.attention.windows import AxisWindow, tap_weights

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Layout: whole arrays <-> one loop step's tiles and halos.


def _slab_start(step: Array, p: Plan, rt: AxisTiles) -> tuple[Array, ...]:
    """Where loop step ``step``'s rows start in a ``[b, H', W, h, e]`` array whose rows are
    padded as the keys' halos need (``rt.pad_before`` first)."""
    image, row, head = p.origin(step)
    return image, row * p.tile_rows * rt.tile, jnp.zeros_like(step), head, jnp.zeros_like(step)


def _step_tiles(x: Array, step: Array, p: Plan, rt: AxisTiles, ct: AxisTiles) -> Array:
    """A step's query tiles ``[J, heads, tr*tc, e]`` (``J = images*rows*Tc``) of ``[b, H, W,
    h, e]`` (zeros past the image)."""
    return _step_blocks(x, step, p, (rt.tile, ct.tile), (0, 0))


def _step_halos(x: Array, step: Array, p: Plan, rt: AxisTiles, ct: AxisTiles) -> Array:
    """A step's key (or value) halos ``[J, heads, halo_r*halo_c, e]`` of ``[b, H, W, h, e]``
    (zeros past the image)."""
    return _step_blocks(x, step, p, (rt.halo, ct.halo), (rt.pad_before, ct.pad_before))


def _step_blocks(x: Array, step: Array, p: Plan, extent, shift) -> Array:
    """The ``extent``-sized block of ``x`` ``[b, H, W, h, e]`` at each of a step's tiles,
    starting ``shift`` before the tile: ``[J, heads, extent_r*extent_c, e]``. One gather
    from the unpadded array, with zeros past the image, so nothing makes a padded copy."""
    rt, ct = p.q_rows, p.q_cols
    image, row, head = p.origin(step)
    _, height, width, _, e = x.shape
    x = jax.lax.dynamic_slice(x, (image, 0, 0, head, 0), (p.images, height, width, p.heads, e))
    rows = np.arange(p.tile_rows)[:, None, None, None] * rt.tile
    rows = rows + np.arange(extent[0])[None, None, :, None] - shift[0]
    cols = np.arange(ct.tiles)[None, :, None, None] * ct.tile
    cols = cols + np.arange(extent[1])[None, None, None, :] - shift[1]
    rows, cols = np.broadcast_arrays(rows, cols)  # [rows, Tc, extent_r, extent_c]
    rows = rows + row * p.tile_rows * rt.tile
    inside = (rows >= 0) & (rows < height) & jnp.asarray((cols >= 0) & (cols < width))
    blocks = x[:, jnp.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)]
    blocks = jnp.where(inside[None, ..., None, None], blocks, 0)  # [I, rows, Tc, r, c, h, e]
    blocks = blocks.transpose(0, 1, 2, 5, 3, 4, 6)
    return blocks.reshape(p.images * p.tile_rows * ct.tiles, p.heads, -1, e)


def _tables_of(step: Array, p: Plan) -> tuple[Array, Array]:
    """A step's ``(row_index [J, 1, n, halo_r], col_index [J, 1, n, halo_c])`` (see
    ``_step_tables``; the same for each of the step's images)."""
    pattern = jnp.asarray(p.pattern)[p.origin(step)[1]]

    def for_images(x: Array) -> Array:
        return jnp.broadcast_to(x, (p.images,) + x.shape).reshape(-1, *x.shape[1:])

    return for_images(jnp.asarray(p.row_index)[pattern]), for_images(jnp.asarray(p.col_index))


def _untile_step(x: Array, p: Plan, rt: AxisTiles, ct: AxisTiles) -> Array:
    """The inverse of ``_step_tiles``: ``[J, h, tr*tc, e]`` ->
    ``[images, rows*tr, Tc*tc, h, e]``."""
    _, heads, _, e = x.shape
    x = x.reshape(p.images, p.tile_rows, ct.tiles, heads, rt.tile, ct.tile, e)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(p.images, p.tile_rows * rt.tile, ct.tiles * ct.tile, heads, e)


def _unstep(x: Array, p: Plan) -> Array:
    """Stacked ``_untile_step`` outputs ``[steps, images, rows*tr, W', heads, ...]`` ->
    ``[b, Tr*tr, W', h, ...]``."""
    _, images, height, width, heads, *rest = x.shape
    x = x.reshape(-1, p.row_steps, p.head_steps, images, height, width, heads, *rest)
    x = x.transpose(0, 3, 1, 4, 5, 2, 6, *range(7, x.ndim))
    return x.reshape(-1, p.row_steps * height, width, p.head_steps * heads, *rest)


# ---------------------------------------------------------------------------------------------
# Logits of one step.


def _row_col_terms(q_t: Array, rel, tables, p: Plan, dtype) -> tuple[Array, Array]:
    """The logit terms of a step's queries that depend only on the halo row, and only on the
    halo column: the relative logits (0 without ``rel``), and ``MASKED`` outside the
    windows. ``[J, h, n, halo_r]`` and ``[J, h, n, halo_c]`` (``h`` is 1 without ``rel``).

    Each is one gather from the query's logits against the whole relative table with a
    ``MASKED`` entry appended, so the mask costs nothing more. The gather's result is laid out
    as the logits are (heads before queries), so nothing downstream transposes it."""
    half = q_t.shape[-1] // 2
    parts = (q_t[..., :half], q_t[..., half:])
    lengths = (p.rows.rel_length, p.cols.rel_length)
    terms = []
    for axis, index in enumerate(tables):
        if rel:
            table = rel[axis].astype(q_t.dtype)
            per_row = jnp.einsum("jhne,re->jhnr", parts[axis], table, preferred_element_type=dtype)
        else:
            per_row = jnp.zeros((*index.shape[:3], lengths[axis]), dtype)
        outside = jnp.full((*per_row.shape[:3], 1), MASKED, dtype)
        per_row = jnp.concatenate([per_row, outside], axis=-1)
        index = jnp.broadcast_to(index, (*per_row.shape[:3], index.shape[-1]))
        terms.append(jnp.take_along_axis(per_row, index, axis=-1, mode="promise_in_bounds"))
    return terms[0], terms[1]


def _indicators(rt: AxisTiles, ct: AxisTiles) -> np.ndarray:
    """``[halo_r + halo_c, halo_r*halo_c]`` 0/1: row ``r`` marks the keys of halo row ``r``,
    row ``halo_r + c`` those of halo column ``c``."""
    rows, cols = np.divmod(np.arange(rt.halo * ct.halo), ct.halo)
    return np.concatenate([np.eye(rt.halo)[:, rows], np.eye(ct.halo)[:, cols]], axis=0)


def _logits(
    dots: Array | None, by_row: Array, by_col: Array, rt: AxisTiles, ct: AxisTiles
) -> Array:
    """``[J, h, n, halo]`` logits from the q·k products (None: no keys) and the row and
    column terms. The
    terms are spread over the keys by a plain 2-D matmul with ``_indicators`` and added in
    one contiguous pass: XLA's CPU loop fusions run the equivalent broadcast-adds, whose
    indices wrap every ``halo_c`` elements, several times slower (measured in the README)."""
    terms = jnp.concatenate([by_row, by_col], axis=-1)
    ones = jnp.asarray(_indicators(rt, ct), by_row.dtype)
    spread = jnp.dot(terms.reshape(-1, terms.shape[-1]), ones)
    spread = spread.reshape(*terms.shape[:-1], ones.shape[-1])
    return spread if dots is None else dots + spread


def _query_logits(q_t, k_halo, rel, tables, p: Plan, dtype):
    """``[J, h, tr*tc, halo]`` logits of a step's query tiles, ``MASKED`` (or twice that)
    outside the windows. ``k_halo`` None: the relative terms alone."""
    dots = _dots(q_t, k_halo, dtype)
    return _logits(dots, *_row_col_terms(q_t, rel, tables, p, dtype), p.q_rows, p.q_cols)


def _dots(q_t: Array, k_halo: Array | None, dtype) -> Array | None:
    """``[J, h, n, halo]`` q·k products, or None without keys."""
    if k_halo is None:
        return None
    return jnp.einsum("jhnd,jhmd->jhnm", q_t, k_halo, preferred_element_type=dtype)


def _loop(body, steps: int):
    """Stacks ``body(step)`` over ``steps`` (a loop, so one step's logits are alive at once)."""
    if steps == 1:
        return jax.tree.map(lambda x: x[None], body(jnp.asarray(0, jnp.int32)))
    return jax.lax.map(body, jnp.arange(steps, dtype=jnp.int32))


# ---------------------------------------------------------------------------------------------
# The forward and backward passes.


def _forward(q, k, v, rel, p: Plan, with_weights: bool):
    """Output ``[b, H, W, h, dv]``; log-sum-exp ``[b, H', W', h]`` and halo weights
    ``[b, H', W', h, halo]`` (or None) on the tile grid."""
    rt, ct = p.q_rows, p.q_cols
    dtype = softmax_dtype(q.dtype)

    def body(step):
        q_t = _step_tiles(q, step, p, rt, ct)
        k_halo = None if k is None else _step_halos(k, step, p, rt, ct)
        v_halo = _step_halos(v, step, p, rt, ct)
        tables = _tables_of(step, p)
        logits = _query_logits(q_t, k_halo, rel, tables, p, dtype)
        top = jnp.max(logits, axis=-1, keepdims=True)
        exps = jnp.exp(logits - top)
        total = jnp.sum(exps, axis=-1, keepdims=True)
        acc = jnp.promote_types(v.dtype, dtype)
        out = jnp.einsum(
            "jhnm,jhmd->jhnd", exps.astype(v.dtype), v_halo, preferred_element_type=acc
        )
        weights = _untile_step(exps / total, p, rt, ct) if with_weights else None
        out = _untile_step((out / total).astype(v.dtype), p, rt, ct)
        return out, _untile_step(top + jnp.log(total), p, rt, ct)[..., 0], weights

    if with_weights:
        body = jax.checkpoint(body)
    out, lse, weights = _loop(body, p.steps)
    weights = None if weights is None else _unstep(weights, p)
    return _unstep(out, p)[:, : q.shape[1], : q.shape[2]], _unstep(lse, p), weights


def _fold_step(x: Array, p: Plan, rt: AxisTiles, ct: AxisTiles) -> Array:
    """Adds up a step's per-halo contributions ``[J, h, e, halo_r*halo_c]`` where the halos
    overlap: ``[images, (rows-1)*tr + halo_r, W, h, e]``, the step's rows of the keys'
    gradient with its rows zero-padded as the halos reach (the columns are cropped to the
    image). Sums of shifted slices (``ceil(halo/tile)`` per axis): nothing is scattered."""
    _, heads, e, _ = x.shape
    s_r, s_c = math.ceil(rt.halo / rt.tile), math.ceil(ct.halo / ct.tile)
    width = (ct.tiles + s_c - 1) * ct.tile
    x = x.reshape(p.images, p.tile_rows, ct.tiles, heads, e, rt.halo, ct.halo)
    pads = [(0, s_r * rt.tile - rt.halo), (0, s_c * ct.tile - ct.halo)]
    x = jnp.pad(x, [(0, 0)] * 5 + pads)
    x = x.reshape(p.images, p.tile_rows, ct.tiles, heads, e, s_r * rt.tile, s_c, ct.tile)
    columns = 0
    for s in range(s_c):
        part = x[..., s, :].transpose(0, 1, 5, 2, 6, 3, 4)  # [I, G, S_r*tr, Tc, tc, h, e]
        part = part.reshape(*part.shape[:3], ct.tiles * ct.tile, heads, e)
        after = width - (ct.tiles + s) * ct.tile
        columns = columns + jnp.pad(part, [(0, 0)] * 3 + [(s * ct.tile, after), (0, 0), (0, 0)])
    columns = columns.reshape(p.images, p.tile_rows, s_r, rt.tile, width, heads, e)
    rows = 0
    for s in range(s_r):
        pads = [(0, 0), (s, s_r - 1 - s)] + [(0, 0)] * 4
        rows = rows + jnp.pad(columns[:, :, s], pads)
    rows = rows.reshape(p.images, -1, width, heads, e)  # the rest is zero padding:
    columns = slice(ct.pad_before, ct.pad_before + p.cols.size)
    return rows[:, : (p.tile_rows - 1) * rt.tile + rt.halo, columns]


def _row_col_sums(x: Array, rt: AxisTiles, ct: AxisTiles) -> tuple[Array, Array]:
    """``[J, h, n, halo_r*halo_c]`` -> its sums over each halo row ``[J, h, n, halo_r]`` and
    each halo column ``[J, h, n, halo_c]``: the transpose of ``_logits``' spreading, one 2-D
    matmul with the ``_indicators`` (the second of the two reductions it replaces is over a
    strided axis)."""
    ones = jnp.asarray(_indicators(rt, ct).T, x.dtype)
    sums = jnp.dot(x.reshape(-1, x.shape[-1]), ones)
    sums = sums.reshape(*x.shape[:-1], rt.halo + ct.halo)
    return sums[..., : rt.halo], sums[..., rt.halo :]


def _backward_pass(q, k, v, rel, d_out, lse, delta, p: Plan):
    """``(dq, dk, dv, d_rel)`` in one loop over the forward's steps, recomputing the logits.
    ``dk`` and ``dv`` come per key halo and are added up where the halos overlap; ``dk`` is
    None without keys."""
    rt, ct = p.q_rows, p.q_cols
    dtype = softmax_dtype(q.dtype)
    lse, delta = lse[:, : q.shape[1], : q.shape[2], :, None], delta[..., None]
    height, width = v.shape[1] + rt.pad_before + rt.pad_after, v.shape[2]
    acc = jnp.promote_types(v.dtype, dtype)
    carried = [x for x in (k, v) if x is not None]
    grads = tuple(
        jnp.zeros((q.shape[0], height, width, q.shape[3], x.shape[-1]), acc) for x in carried
    )

    def body(grads, step):
        q_t = _step_tiles(q, step, p, rt, ct)
        d_t = _step_tiles(d_out, step, p, rt, ct).astype(dtype)
        lse_t = _step_tiles(lse, step, p, rt, ct)
        delta_t = _step_tiles(delta, step, p, rt, ct)
        k_halo = None if k is None else _step_halos(k, step, p, rt, ct)
        v_halo = _step_halos(v, step, p, rt, ct)
        tables = _tables_of(step, p)
        d_rel = ()
        (by_row, by_col), rel_vjp = jax.vjp(
            lambda q_t, rel: _row_col_terms(q_t, rel, tables, p, dtype), q_t, rel
        )
        logits = _logits(_dots(q_t, k_halo, dtype), by_row, by_col, rt, ct)
        probs = jnp.exp(logits - lse_t)
        d_probs = jnp.einsum("jhnd,jhmd->jhnm", d_t, v_halo, preferred_element_type=dtype)
        d_logits = probs * (d_probs - delta_t)
        d_q = jnp.zeros(q_t.shape, dtype)
        if k_halo is not None:
            d_q = jnp.einsum("jhnm,jhmd->jhnd", d_logits, k_halo.astype(dtype))
        if rel:
            d_q_rel, d_rel = rel_vjp(_row_col_sums(d_logits, rt, ct))
            d_q = d_q + d_q_rel
        # [J, h, e, halo]: queries-major operands, so both are plain matmuls.
        q_major, d_major = jax.lax.optimization_barrier(
            (jnp.swapaxes(q_t, 2, 3).astype(dtype), jnp.swapaxes(d_t, 2, 3))
        )
        parts = [jnp.einsum("jhen,jhnm->jhem", d_major, probs)]  # d_v
        if k is not None:
            parts.insert(0, jnp.einsum("jhen,jhnm->jhem", q_major, d_logits))  # d_k
        index = _slab_start(step, p, rt)
        new = []
        for total, part in zip(grads, parts, strict=True):
            slab = _fold_step(part.astype(acc), p, rt, ct)
            old = jax.lax.dynamic_slice(total, index, slab.shape)
            new.append(jax.lax.dynamic_update_slice(total, old + slab, index))
        return tuple(new), (_untile_step(d_q, p, rt, ct), d_rel)

    summed, (d_q, d_rel) = jax.lax.scan(body, grads, jnp.arange(p.steps, dtype=jnp.int32))
    d_q = _unstep(d_q, p)[:, : q.shape[1], : q.shape[2]]
    rows = slice(rt.pad_before, rt.pad_before + v.shape[1])
    summed = [g[:, rows] for g in summed]
    d_k = summed.pop(0) if k is not None else None
    return d_q, d_k, summed[0], jax.tree.map(lambda g: g.sum(0), d_rel)


def _tap_weights(weights: Array, p: Plan) -> Array:
    """Halo weights ``[b, H', W', h, halo]`` -> ``[b, H, W, h, kh*kw]`` (0 if masked)."""
    tap_r, tap_c = tap_keys(p.rows, p.q_rows), tap_keys(p.cols, p.q_cols)
    return tap_weights(weights, tap_r, tap_c, p.q_cols.halo, p.rows, p.cols)


def _tile(rows: AxisWindow, tiled: bool) -> int | None:
    """The query tile: ``tiles.TILE`` (a multiple of the block for block attention) for
    "tiled", the whole map (None) for "dense"."""
    return tiles.tile_size(rows, tiles.TILE) if tiled else None


def _kernel(tiled: bool) -> Kernel:
    """The primitive's passes: the output and log-sum-exp, and the gradients from them."""

    def forward(q, k, v, rel_row, rel_col, rows, cols, platform):
        p = plan(rows, cols, _tile(rows, tiled), batch=q.shape[0], heads=q.shape[3])
        rel = () if rel_row is None else (rel_row, rel_col)
        with exact_matmuls(q.dtype):
            out, lse, _ = _forward(q, k, v, rel, p, with_weights=False)
        return out, lse[:, : q.shape[1], : q.shape[2]].astype(jnp.float32)

    def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform):
        p = plan(rows, cols, _tile(rows, tiled), batch=q.shape[0], heads=q.shape[3])
        rel = () if rel_row is None else (rel_row, rel_col)
        dtype = softmax_dtype(q.dtype)
        delta = jnp.sum(d_out.astype(dtype) * out.astype(dtype), axis=-1)  # [b, H, W, h]
        with exact_matmuls(q.dtype):
            d_q, d_k, d_v, d_rel = _backward_pass(q, k, v, rel, d_out, lse.astype(dtype), delta, p)
        d_row, d_col = d_rel if rel else (None, None)
        return d_q, d_k, d_v, d_row, d_col

    return Kernel(forward, backward)


def _with_weights(tiled: bool):
    """``local_attention`` with the weights: the forward pass keeps the halo weights (its
    gradient is autodiff's through the loop)."""

    def fn(q, k, v, rel_row, rel_col, rows, cols, return_weights):
        p = plan(rows, cols, _tile(rows, tiled), batch=q.shape[0], heads=q.shape[3])
        rel = () if rel_row is None else (rel_row, rel_col)
        with exact_matmuls(q.dtype):
            out, _, weights = _forward(q, k, v, rel, p, with_weights=True)
        return (out, _tap_weights(weights, p)) if return_weights else out

    return fn


register(Implementation("dense", _with_weights(False), _kernel(False)))
register(Implementation("tiled", _with_weights(True), _kernel(True)))
