"""Query tiles and key halos along each axis, and the loop steps over them ("tiled", "dense").

The map is cut into tiles of queries; each tile attends to every key of its halo (the tile
grown by the window's reach). Static per-axis tables say, for each query of a tile and each
halo key, which relative-table row the pair reads, or that the key is outside the query's
window. ``plan`` groups the tiles into loop steps of at most ``step_elements()`` logits:
whole images, or some rows of tiles of one image, or some heads of one row of tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from sasa_jax.attention.windows import BLOCKS, AxisWindow, axis_window

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
# Not measured on an accelerator with this step structure.
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


def query_tiles(win: AxisWindow, tile: int) -> AxisTiles:
    """Tiles of queries, each with the halo of keys its windows reach."""
    member = win.member
    queries = np.broadcast_to(np.arange(win.size)[:, None], member.shape)
    args = (queries[member], win.position[member], win.rel_index[member], win.size)
    tiles = _tile_pairs(*args, tile)
    # Query positions past the image see their own (zero) key, to keep the softmax finite.
    for position in range(win.size, tiles.tiles * tiles.tile):
        a = position % tiles.tile
        tiles.rel[position // tiles.tile, a, a + tiles.pad_before] = 0
    return tiles


def tile_size(win: AxisWindow, size: int) -> int:
    """A query tile of about ``size`` positions along ``win``'s axis; for ``block_attention``'s
    windows (``BLOCKS``) a whole number of blocks, so that every tile is its own halo."""
    if win.border == BLOCKS:
        return win.window * max(1, size // win.window)
    return size


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


def batch_chunk(batch: int, per_image: int, max_elements: int) -> int:
    """The largest divisor of ``batch`` whose ``chunk * per_image`` fits in ``max_elements``
    (at least 1)."""
    fits = [c for c in range(1, batch + 1) if batch % c == 0 and c * per_image <= max_elements]
    return max(fits, default=1)


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
