"""Exact local attention as masked dense attention over tiles: "dense" and "tiled".

The map is cut into tiles of queries. Each tile attends to every key of its halo (the tile
grown by the window's reach) through two batched matmuls; static per-axis tables mask the halo
keys outside each query's window and pick the relative-table row of those inside. This is
HaloNet's blocking made exact for every border. The mask is a finite ``MASKED`` logit term
(-1e30), whose exponential is exactly 0 as -inf's is, so that it can go through a matmul.

- "dense": one tile covers the whole map. It does (H'·W')/(kh·kw) times the useful work, so
  it pays off on small maps (the 7×7 and 14×14 stages of a ResNet at 224²).
- "tiled": ``TILE``×``TILE`` query tiles with a halo, (TILE+k-1)²/TILE² times the useful work
  on large maps.

The work runs in a loop. A step takes whole images, or some rows of tiles of one image, or some
heads of one row of tiles, up to ``step_elements()`` logits, so on CPU a step's logits stay in
cache; it gathers its query tiles and key halos from the unpadded arrays. The forward pass keeps
only the output and the log-sum-exp. The backward pass (a ``custom_vjp``) loops over the same
steps once, recomputing the logits flash-attention style: ``dq`` and the relative tables'
gradients come from the query side, and ``dk`` and ``dv`` per key halo, added up where halos
overlap as sums of shifted slices, so they are never scattered, and autodiff's halo
transposes and saved logits are gone.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention.api import Implementation, register, softmax_dtype
from sasa_jax.attention.chunks import batch_chunk
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

# The logit term of a key outside a query's window: finite, because the terms reach the
# logits through a matmul (0 * -inf would be NaN), and so large that exp(logit - max) is 0.
MASKED = -1e30

# Query (and key) tile of "tiled" along each axis.
TILE = 4

# Largest logits tensor (elements) one loop step may make on CPU: 1 MiB in float32, half a
# core's L2 cache here (the backward pass keeps about four such tensors alive). A step holds
# whole images, or rows of tiles of one image, or some heads of one row of tiles. 2**19 was
# as fast at every ResNet stage shape and at 14x14 took 3.1x the conv's temp memory, not 2.6x.
CHUNK_ELEMENTS = 2**18

# The same on GPU and TPU, where each step costs kernel launches rather than cache misses.
# Not measured with this code: the H100 numbers in the README are for the previous version,
# which ran one image per step.
ACCELERATOR_CHUNK_ELEMENTS = 2**22


def step_elements(backend: str | None = None) -> int:
    """The logits budget of one loop step on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    return CHUNK_ELEMENTS if backend == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTiles:
    """Tiles of queries along one axis and, for each, the halo of keys their windows reach.

    Attributes:
      tile: positions per tile; ``tiles * tile >= size`` (the last tile may overhang).
      tiles: number of tiles.
      halo: keys per tile.
      pad_before, pad_after: how far the halos reach before the first and past the last
        position: the keys' axis as if zero-padded so that every halo is a slice.
      rel: ``[tiles, tile, halo]`` int, the relative-table row of the pair (tile position
        ``a`` of tile ``i``, halo position ``m``), or -1 when they are not a pair.
    """

    tile: int
    tiles: int
    halo: int
    pad_before: int
    pad_after: int
    rel: np.ndarray


def _tile_pairs(
    queries: np.ndarray,
    keys: np.ndarray,
    rel: np.ndarray,
    size: int,
    tile: int,
) -> AxisTiles:
    """Tiles over the query positions (``[0, size)``) of a list of (query, key, relative row)
    pairs; keys outside ``[0, size)`` are zero padding."""
    tile = min(tile, size)
    tiles = math.ceil(size / tile)
    offset = keys - (queries // tile) * tile  # the key relative to its query tile's start
    lo = int(min(0, offset.min()))
    hi = int(max(tile - 1, offset.max()))
    halo = hi - lo + 1
    table = np.full((tiles, tile, halo), -1, dtype=np.int32)
    table[queries // tile, queries % tile, offset - lo] = rel
    pad_after = max(0, (tiles - 1) * tile + hi - (size - 1))
    return AxisTiles(tile, tiles, halo, -lo, pad_after, table)


def _member_taps(win: AxisWindow) -> np.ndarray:
    """``[size, window]`` bool: the tap takes part in the softmax (every tap under "zeros",
    whose outside taps are zero keys; only those inside the image otherwise)."""
    return np.ones_like(win.valid) if win.border == "zeros" else win.valid


def query_tiles(win: AxisWindow, tile: int) -> AxisTiles:
    """Tiles of queries, each with the halo of keys its windows reach."""
    member = _member_taps(win)
    queries = np.broadcast_to(np.arange(win.size)[:, None], member.shape)
    args = (queries[member], win.position[member], win.rel_index[member], win.size)
    tiles = _tile_pairs(*args, tile)
    # Query positions past the image see their own (zero) key, to keep the softmax finite.
    for position in range(win.size, tiles.tiles * tiles.tile):
        a = position % tiles.tile
        tiles.rel[position // tiles.tile, a, a + tiles.pad_before] = 0
    return tiles


def tap_keys(win: AxisWindow, tiles: AxisTiles) -> np.ndarray:
    """``[size, window]`` int: the halo index of tap ``t`` of query ``y`` (clipped)."""
    start = (np.arange(win.size) // tiles.tile) * tiles.tile
    offset = win.position - start[:, None] + tiles.pad_before
    return np.clip(offset, 0, tiles.halo - 1).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything static about one geometry, tile size and batch (cached; hashed by identity).

    A loop step covers ``images`` images times ``rows`` tile rows times ``heads`` heads;
    ``steps`` of them cover the batch; ``rows`` divides the image's rows of tiles.
    Steps are numbered image-major, then by tile row, then by head.
    """

    rows: AxisWindow
    cols: AxisWindow
    q_rows: AxisTiles
    q_cols: AxisTiles
    images: int
    tile_rows: int
    heads: int
    head_steps: int
    steps: int
    pattern: np.ndarray
    row_index: np.ndarray
    col_index: np.ndarray

    @property
    def row_steps(self) -> int:
        return self.q_rows.tiles // self.tile_rows

    def origin(self, step: Array) -> tuple[Array, Array, Array]:
        """``(first image, tile row, first head)`` of loop step ``step``."""
        head = step % self.head_steps
        row = step // self.head_steps % self.row_steps
        image = step // (self.head_steps * self.row_steps)
        return image * self.images, row, head * self.heads


def _step_size(
    tile_rows: int, per_row: int, batch: int, heads: int, budget: int
) -> tuple[int, int, int]:
    """``(images, rows, heads)`` per step: whole images when one image fits in ``budget``
    logits; else the most rows of tiles that fit and divide the image's rows of tiles (a
    padded row of tiles costs a row's compute and its halo's memory; one more small step
    costs about as much, measured at 28x28); else some of the heads of one row of tiles."""
    if per_row > budget:
        divisors = (d for d in range(1, heads + 1) if heads % d == 0)
        return 1, 1, max((d for d in divisors if per_row * d <= budget * heads), default=1)
    most = min(tile_rows, budget // per_row)
    rows = max(d for d in range(1, most + 1) if tile_rows % d == 0)
    if rows < tile_rows:
        return 1, rows, heads
    return batch_chunk(batch, tile_rows * per_row, budget), rows, heads


@functools.lru_cache(maxsize=256)
def _plan(rows_key: tuple, cols_key: tuple, tile, batch: int, heads: int, budget: int) -> Plan:
    rows, cols = axis_window(*rows_key), axis_window(*cols_key)
    tr, tc = tile or rows.size, tile or cols.size
    q_rows, q_cols = query_tiles(rows, tr), query_tiles(cols, tc)
    per_row = q_cols.tiles * heads * q_rows.tile * q_cols.tile * q_rows.halo * q_cols.halo
    images, tile_rows, step_heads = _step_size(q_rows.tiles, per_row, batch, heads, budget)
    return Plan(
        rows,
        cols,
        q_rows,
        q_cols,
        images,
        tile_rows,
        step_heads,
        heads // step_heads,
        batch // images * (q_rows.tiles // tile_rows) * (heads // step_heads),
        *_step_tables(q_rows, q_cols, tile_rows, (rows.rel_length, cols.rel_length)),
    )


def _step_tables(rt: AxisTiles, ct: AxisTiles, tile_rows: int, lengths: tuple[int, int]):
    """The tables of one image's part of a step, over its tiles ``J1 = rows*Tc`` and queries
    ``n = (a, b)``, for each distinct row step (a border row differs; the inner ones repeat).
    A halo key is in a query's window when its row and its column are (the mask is
    separable), so each axis has its own table: the relative-table row of each halo row (or
    column), or the table's length ``L`` (one past its end) where it is outside the window.

    - pattern ``[row_steps]`` int32: which distinct row table each row step uses;
    - row_index ``[patterns, J1, 1, n, halo_r]`` int32;
    - col_index ``[J1, 1, n, halo_c]`` int32."""
    row_steps = rt.tiles // tile_rows
    distinct, first, pattern = np.unique(
        rt.rel.reshape(row_steps, -1), axis=0, return_index=True, return_inverse=True
    )
    # [patterns, rows, Tc, tr, tc, halo_r] and [rows, Tc, tr, tc, halo_c]: the table rows.
    rows = rt.rel.reshape(row_steps, tile_rows, 1, rt.tile, 1, rt.halo)[first]
    rows = np.broadcast_to(rows, (len(distinct), tile_rows, ct.tiles, rt.tile, ct.tile, rt.halo))
    cols = np.broadcast_to(ct.rel[:, None], (tile_rows, ct.tiles, rt.tile, ct.tile, ct.halo))
    shape = (tile_rows * ct.tiles, 1, rt.tile * ct.tile)
    rows = rows.reshape(len(distinct), *shape, rt.halo)
    cols = cols.reshape(*shape, ct.halo)
    return (
        pattern.reshape(-1).astype(np.int32),
        np.where(rows >= 0, rows, lengths[0]).astype(np.int32),
        np.where(cols >= 0, cols, lengths[1]).astype(np.int32),
    )


def plan(rows: AxisWindow, cols: AxisWindow, tile: int | None, batch: int, heads: int) -> Plan:
    """The tiles and loop steps of a geometry (cached); ``tile=None``: one tile per axis."""
    return _plan(rows.spec, cols.spec, tile, batch, heads, step_elements())


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


def _logits(dots: Array, by_row: Array, by_col: Array, rt: AxisTiles, ct: AxisTiles) -> Array:
    """``[J, h, n, halo]`` logits from the q·k products and the row and column terms. The
    terms are spread over the keys by a plain 2-D matmul with ``_indicators`` and added in
    one contiguous pass: XLA's CPU loop fusions run the equivalent broadcast-adds, whose
    indices wrap every ``halo_c`` elements, several times slower (measured in the README)."""
    terms = jnp.concatenate([by_row, by_col], axis=-1)
    ones = jnp.asarray(_indicators(rt, ct), dots.dtype)
    spread = jnp.dot(terms.reshape(-1, terms.shape[-1]), ones)
    return dots + spread.reshape(*terms.shape[:-1], ones.shape[-1])


def _query_logits(q_t, k_halo, rel, tables, p: Plan, dtype):
    """``[J, h, tr*tc, halo]`` logits of a step's query tiles, ``MASKED`` (or twice that)
    outside the windows."""
    dots = jnp.einsum("jhnd,jhmd->jhnm", q_t, k_halo, preferred_element_type=dtype)
    return _logits(dots, *_row_col_terms(q_t, rel, tables, p, dtype), p.q_rows, p.q_cols)


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
        k_halo = _step_halos(k, step, p, rt, ct)
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
    ``dk`` and ``dv`` come per key halo and are added up where the halos overlap."""
    rt, ct = p.q_rows, p.q_cols
    dtype = softmax_dtype(q.dtype)
    lse, delta = lse[:, : q.shape[1], : q.shape[2], :, None], delta[..., None]
    height, width = k.shape[1] + rt.pad_before + rt.pad_after, k.shape[2]
    acc = jnp.promote_types(k.dtype, dtype)
    grads = (
        jnp.zeros((q.shape[0], height, width, q.shape[3], k.shape[-1]), acc),
        jnp.zeros((q.shape[0], height, width, q.shape[3], v.shape[-1]), acc),
    )

    def body(grads, step):
        q_t = _step_tiles(q, step, p, rt, ct)
        d_t = _step_tiles(d_out, step, p, rt, ct).astype(dtype)
        lse_t = _step_tiles(lse, step, p, rt, ct)
        delta_t = _step_tiles(delta, step, p, rt, ct)
        k_halo = _step_halos(k, step, p, rt, ct)
        v_halo = _step_halos(v, step, p, rt, ct)
        tables = _tables_of(step, p)
        dots = jnp.einsum("jhnd,jhmd->jhnm", q_t, k_halo, preferred_element_type=dtype)
        d_rel = ()
        (by_row, by_col), rel_vjp = jax.vjp(
            lambda q_t, rel: _row_col_terms(q_t, rel, tables, p, dtype), q_t, rel
        )
        logits = _logits(dots, by_row, by_col, rt, ct)
        probs = jnp.exp(logits - lse_t)
        d_probs = jnp.einsum("jhnd,jhmd->jhnm", d_t, v_halo, preferred_element_type=dtype)
        d_logits = probs * (d_probs - delta_t)
        d_q = jnp.einsum("jhnm,jhmd->jhnd", d_logits, k_halo.astype(dtype))
        if rel:
            d_q_rel, d_rel = rel_vjp(_row_col_sums(d_logits, rt, ct))
            d_q = d_q + d_q_rel
        # [J, h, e, halo]: queries-major operands, so both are plain matmuls.
        q_major, d_major = jax.lax.optimization_barrier(
            (jnp.swapaxes(q_t, 2, 3).astype(dtype), jnp.swapaxes(d_t, 2, 3))
        )
        d_k = jnp.einsum("jhen,jhnm->jhem", q_major, d_logits)
        d_v = jnp.einsum("jhen,jhnm->jhem", d_major, probs)
        index = _slab_start(step, p, rt)
        new = []
        for total, part in zip(grads, (d_k, d_v), strict=True):
            slab = _fold_step(part.astype(acc), p, rt, ct)
            old = jax.lax.dynamic_slice(total, index, slab.shape)
            new.append(jax.lax.dynamic_update_slice(total, old + slab, index))
        return tuple(new), (_untile_step(d_q, p, rt, ct), d_rel)

    (d_k, d_v), (d_q, d_rel) = jax.lax.scan(body, grads, jnp.arange(p.steps, dtype=jnp.int32))
    d_q = _unstep(d_q, p)[:, : q.shape[1], : q.shape[2]]
    rows = slice(rt.pad_before, rt.pad_before + k.shape[1])
    return d_q, d_k[:, rows], d_v[:, rows], jax.tree.map(lambda g: g.sum(0), d_rel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, rel, p: Plan):
    return _forward(q, k, v, rel, p, with_weights=False)[0]


def _attend_fwd(q, k, v, rel, p: Plan):
    out, lse, _ = _forward(q, k, v, rel, p, with_weights=False)
    return out, (q, k, v, rel, out, lse)


def _attend_bwd(p: Plan, residuals, d_out):
    q, k, v, rel, out, lse = residuals
    dtype = softmax_dtype(q.dtype)
    delta = jnp.sum(d_out.astype(dtype) * out.astype(dtype), axis=-1)  # [b, H, W, h]
    d_q, d_k, d_v, d_rel = _backward_pass(q, k, v, rel, d_out, lse, delta, p)
    d_rel = jax.tree.map(lambda g, t: g.astype(t.dtype), d_rel, rel)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_rel


_attend.defvjp(_attend_fwd, _attend_bwd)


def _tap_weights(weights: Array, p: Plan) -> Array:
    """Halo weights ``[b, H', W', h, halo]`` -> ``[b, H, W, h, kh*kw]`` (0 if masked)."""
    rows, cols = p.rows, p.cols
    grid = weights[:, : rows.size, : cols.size]
    tap_r, tap_c = tap_keys(rows, p.q_rows), tap_keys(cols, p.q_cols)
    flat = tap_r[:, None, :, None] * p.q_cols.halo + tap_c[None, :, None, :]
    flat = flat.reshape(rows.size, cols.size, 1, -1)
    picked = jnp.take_along_axis(grid, jnp.asarray(flat)[None], axis=-1)
    valid = _member_taps(rows)[:, None, :, None] & _member_taps(cols)[None, :, None, :]
    return jnp.where(jnp.asarray(valid.reshape(rows.size, cols.size, 1, -1)), picked, 0)


def _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile: int | None):
    p = plan(rows, cols, tile, batch=q.shape[0], heads=q.shape[3])
    rel = () if rel_row is None else (rel_row, rel_col)
    if not return_weights:
        return _attend(q, k, v, rel, p)
    out, _, weights = _forward(q, k, v, rel, p, with_weights=True)
    return out, _tap_weights(weights, p)


def dense_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` as masked dense attention (one tile); arguments are checked."""
    return _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile=None)


def tiled_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` over ``TILE``-square query tiles with key halos."""
    return _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile=TILE)


register(Implementation("dense", dense_attention))
register(Implementation("tiled", tiled_attention))

__all__ = [
    "CHUNK_ELEMENTS",
    "TILE",
    "dense_attention",
    "plan",
    "query_tiles",
    "step_elements",
    "tiled_attention",
]
