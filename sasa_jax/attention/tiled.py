"""Exact local attention as masked dense attention over tiles: "dense" and "tiled".

The map is cut into tiles of queries. Each tile attends to every key of its halo (the tile
grown by the window's reach) through two batched matmuls; static per-axis tables mask the halo
keys outside each query's window and pick the relative-table row of those inside. This is
HaloNet's blocking made exact for every border.

- "dense": one tile covers the whole map. It does (H'·W')/(kh·kw) times the useful work, so
  it pays off on small maps (the 7×7 and 14×14 stages of a ResNet at 224²).
- "tiled": ``TILE``×``TILE`` query tiles with a halo, (TILE+k-1)²/TILE² times the useful work
  on large maps.

Batched matmuls are what XLA's CPU backend runs fastest, so the wasted work is cheap there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention.api import Implementation, register, softmax_dtype
from sasa_jax.attention.chunks import batch_chunk, map_chunks
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

# Query tile of "tiled" along each axis.
TILE = 4

# Largest logits tensor (elements) one chunk of the batch may make; chunks run in a loop and
# are rematerialised in the backward pass, so only one chunk's logits are alive at a time.
CHUNK_ELEMENTS = 2**19


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTiles:
    """Tiles of queries and their key halos along one axis.

    Attributes:
      tile: queries per tile; ``tiles * tile >= size`` (the last tile may overhang).
      tiles: number of tiles.
      halo: keys per tile.
      pad_before, pad_after: zeros added to the keys so every halo is a slice.
      rel: ``[tiles, tile, halo]`` int, the relative-table row of halo key ``m`` for query
        ``a`` of tile ``i``, or -1 when the key is not in that query's window.
      tap_key: ``[size, window]`` int, the halo index of tap ``t`` of query ``y``.
      tap_valid: ``[size, window]`` bool, the tap is a key (False: outside the image under
        border "mask", weight 0).
    """

    tile: int
    tiles: int
    halo: int
    pad_before: int
    pad_after: int
    rel: np.ndarray
    tap_key: np.ndarray
    tap_valid: np.ndarray


def axis_tiles(win: AxisWindow, tile: int) -> AxisTiles:
    """The tiles of one axis; see ``AxisTiles``. Taps outside the image are zero keys of the
    padding under "zeros" and are left out under "mask"."""
    tile = min(tile, win.size)
    tiles = math.ceil(win.size / tile)
    queries = np.arange(win.size)
    start = (queries // tile) * tile  # first query of each query's tile
    member = np.ones_like(win.valid) if win.border == "zeros" else win.valid
    offset = win.position - start[:, None]  # key position relative to the tile start
    lo = int(min(0, offset[member].min()))
    hi = int(max(tile - 1, offset[member].max()))
    halo = hi - lo + 1
    pad_before = -lo
    pad_after = max(0, (tiles - 1) * tile + hi - (win.size - 1))
    rel = np.full((tiles, tile, halo), -1, dtype=np.int32)
    tap_key = np.clip(offset - lo, 0, halo - 1).astype(np.int32)
    for y in range(win.size):
        for t in np.flatnonzero(member[y]):
            rel[y // tile, y % tile, tap_key[y, t]] = win.rel_index[y, t]
    # Queries of an overhanging last tile see their own (zero) key, to keep the softmax finite.
    for a in range(win.size - (tiles - 1) * tile, tile):
        rel[-1, a, a - lo] = 0
    return AxisTiles(tile, tiles, halo, pad_before, pad_after, rel, tap_key, member)


@functools.lru_cache(maxsize=256)
def _tiles(rows_key: tuple, cols_key: tuple, tile: int | None) -> tuple[AxisTiles, AxisTiles]:
    rows, cols = axis_window(*rows_key), axis_window(*cols_key)
    return (
        axis_tiles(rows, tile or rows.size),
        axis_tiles(cols, tile or cols.size),
    )


def tiles(rows: AxisWindow, cols: AxisWindow, tile: int | None) -> tuple[AxisTiles, AxisTiles]:
    """Row and column tiles (cached per geometry); ``tile=None``: one tile per axis."""
    return _tiles(rows.spec, cols.spec, tile)


def _query_tiles(x: Array, rt: AxisTiles, ct: AxisTiles) -> Array:
    """``[b, H, W, h, d]`` -> ``[b, Tr, Tc, h, tr*tc, d]`` (overhang zero-padded)."""
    b, height, width, heads, dim = x.shape
    pads = ((0, 0), (0, rt.tiles * rt.tile - height), (0, ct.tiles * ct.tile - width))
    x = jnp.pad(x, pads + ((0, 0), (0, 0)))
    x = x.reshape(b, rt.tiles, rt.tile, ct.tiles, ct.tile, heads, dim)
    return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, rt.tiles, ct.tiles, heads, -1, dim)


def _from_query_tiles(x: Array, rt: AxisTiles, ct: AxisTiles, height: int, width: int):
    """The inverse of ``_query_tiles``: ``[b, Tr, Tc, h, tr*tc, d]`` -> ``[b, H, W, h, d]``."""
    b, _, _, heads, _, dim = x.shape
    x = x.reshape(b, rt.tiles, ct.tiles, heads, rt.tile, ct.tile, dim)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6).reshape(b, rt.tiles * rt.tile, -1, heads, dim)
    return x[:, :height, :width]


def _halos(x: Array, rt: AxisTiles, ct: AxisTiles) -> Array:
    """``[b, H, W, h, d]`` keys -> ``[b, Tr, Tc, h, halo_r*halo_c, d]`` halo tiles."""
    pads = ((0, 0), (rt.pad_before, rt.pad_after), (ct.pad_before, ct.pad_after))
    x = jnp.pad(x, pads + ((0, 0), (0, 0)))
    rows = jnp.stack([x[:, i * rt.tile : i * rt.tile + rt.halo] for i in range(rt.tiles)], 1)
    both = jnp.stack(
        [rows[:, :, :, j * ct.tile : j * ct.tile + ct.halo] for j in range(ct.tiles)], 2
    )  # [b, Tr, Tc, halo_r, halo_c, h, d]
    b, tr, tc, hr, hc, heads, dim = both.shape
    return both.transpose(0, 1, 2, 5, 3, 4, 6).reshape(b, tr, tc, heads, hr * hc, dim)


def _relative(q_half: Array, table: Array, rel: np.ndarray, axis: str, dtype) -> Array:
    """``q_half · table[rel]`` for every query and halo key position along one axis:
    ``q_half: [b, Tr, Tc, h, tr, tc, d/2]`` -> ``[b, Tr, Tc, h, tr, tc, halo]`` (0 where
    ``rel`` is -1; those keys are masked)."""
    per_row = jnp.einsum(
        "...d,rd->...r", q_half, table.astype(q_half.dtype), preferred_element_type=dtype
    )
    index = np.maximum(rel, 0)  # [tiles, tile, halo]
    if axis == "rows":
        index = index[None, :, None, None, :, None, :]
    else:
        index = index[None, None, :, None, None, :, :]
    return jnp.take_along_axis(per_row, jnp.asarray(index), axis=-1)


def _attend(q, k, v, *, rel_row, rel_col, rt: AxisTiles, ct: AxisTiles, return_weights):
    """One chunk of the batch; returns ``out`` and the halo weights (or None)."""
    b, height, width, heads, dim = q.shape
    dtype = softmax_dtype(q.dtype)
    q_t = _query_tiles(q, rt, ct)
    logits = jnp.einsum(
        "bijhnd,bijhmd->bijhnm", q_t, _halos(k, rt, ct), preferred_element_type=dtype
    )
    shape = (b, rt.tiles, ct.tiles, heads, rt.tile, ct.tile, rt.halo, ct.halo)
    logits = logits.reshape(shape)
    if rel_row is not None:
        half = dim // 2
        q_grid = q_t.reshape(*shape[:6], dim)
        by_row = _relative(q_grid[..., :half], rel_row, rt.rel, "rows", dtype)
        by_col = _relative(q_grid[..., half:], rel_col, ct.rel, "cols", dtype)
        logits = logits + by_row[..., :, None] + by_col[..., None, :]
    member = (rt.rel >= 0)[:, None, None, :, None, :, None] & (ct.rel >= 0)[
        None, :, None, None, :, None, :
    ]
    logits = jnp.where(jnp.asarray(member), logits, -jnp.inf)
    weights = jax.nn.softmax(logits.reshape(*shape[:4], rt.tile * ct.tile, -1), axis=-1)
    out = jnp.einsum(
        "bijhnm,bijhmd->bijhnd",
        weights.astype(v.dtype),
        _halos(v, rt, ct),
        preferred_element_type=jnp.promote_types(v.dtype, dtype),
    )
    out = _from_query_tiles(out, rt, ct, height, width).astype(v.dtype)
    if not return_weights:
        return out
    return out, _tap_weights(weights, rt, ct, height, width)


def _tap_weights(weights: Array, rt: AxisTiles, ct: AxisTiles, height: int, width: int):
    """Halo weights ``[b, Tr, Tc, h, tr*tc, halo]`` -> ``[b, H, W, h, kh*kw]`` (0 if masked)."""
    grid = _from_query_tiles(weights, rt, ct, height, width)  # [b, H, W, h, halo_r*halo_c]
    flat = rt.tap_key[:, None, :, None] * ct.halo + ct.tap_key[None, :, None, :]
    flat = flat.reshape(height, width, 1, -1)
    picked = jnp.take_along_axis(grid, jnp.asarray(flat)[None], axis=-1)
    valid = rt.tap_valid[:, None, :, None] & ct.tap_valid[None, :, None, :]
    return jnp.where(jnp.asarray(valid.reshape(height, width, 1, -1)), picked, 0)


def _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile: int | None):
    rt, ct = tiles(rows, cols, tile)
    b, _, _, heads, _ = q.shape
    per_image = heads * rt.tiles * ct.tiles * rt.tile * ct.tile * rt.halo * ct.halo
    chunk = batch_chunk(b, per_image, CHUNK_ELEMENTS)
    attend = functools.partial(
        _attend, rel_row=rel_row, rel_col=rel_col, rt=rt, ct=ct, return_weights=return_weights
    )
    return map_chunks(attend, (q, k, v), chunk, max_unrolled=0, remat=True)


def dense_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` as masked dense attention (one tile); arguments are checked."""
    return _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile=None)


def tiled_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` over ``TILE``-square query tiles with key halos."""
    return _run(q, k, v, rel_row, rel_col, rows, cols, return_weights, tile=TILE)


register(Implementation("dense", dense_attention))
register(Implementation("tiled", tiled_attention))

__all__ = ["CHUNK_ELEMENTS", "TILE", "axis_tiles", "dense_attention", "tiled_attention", "tiles"]
