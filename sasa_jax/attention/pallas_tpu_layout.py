"""The TPU layout's geometry (``pallas_tpu``): query tiles of 8x16 positions (128 queries,
one vreg row) and the halo of keys their windows reach, padded to multiples of 128; the
selector tables the kernels read (``[tiles of one axis, M, TQ]``: keys in sublanes, queries in
lanes), and the index maps between the map's positions and the tiles' and halos' slots."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from sasa_jax.attention.pallas_layout import round_up, selectors
from sasa_jax.attention.tiles import AxisTiles, query_tiles, tile_size
from sasa_jax.attention.windows import axis_window

# Query tile (rows, columns): 128 queries, the lane width.
TILE = (8, 16)
LANES = 128


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Static tiles, halos, padded sizes and the selector tables (``[tiles of one axis, M,
    TQ]``: keys in sublanes, queries in lanes) of one geometry."""

    rows: AxisTiles
    cols: AxisTiles
    tq: int
    keys: int
    row_select: np.ndarray
    col_select: np.ndarray
    tile_index: np.ndarray  # [T * TQ]: each tile slot's position (H*W: none)
    halo_index: np.ndarray  # [T * M]: each halo slot's position (H*W: outside the map)
    map_index: np.ndarray  # [H*W]: each position's tile slot

    @property
    def tiles(self) -> int:
        return self.rows.tiles * self.cols.tiles

    @property
    def halos_are_tiles(self) -> bool:
        """Every key's halo is its own query tile (``block_attention``'s blocks): no two
        halos overlap."""
        return bool(np.array_equal(self.halo_index, self.tile_index))


@functools.lru_cache(maxsize=256)
def layout(rows_key: tuple, cols_key: tuple) -> Layout:
    rows, cols = axis_window(*rows_key), axis_window(*cols_key)
    rt = query_tiles(rows, min(tile_size(rows, TILE[0]), rows.size))
    ct = query_tiles(cols, min(tile_size(cols, TILE[1]), cols.size))
    tq = round_up(rt.tile * ct.tile, LANES)
    keys = round_up(rt.halo * ct.halo, LANES)
    row_select, col_select = (np.swapaxes(s, 1, 2) for s in selectors(rt, ct, tq, keys))
    tile_index, map_index = _tile_indices(rt, ct, tq, rows.size, cols.size)
    halo_index = _halo_indices(rt, ct, keys, rows.size, cols.size)
    return Layout(rt, ct, tq, keys, row_select, col_select, tile_index, halo_index, map_index)


def _slots(at: AxisTiles, length: int) -> np.ndarray:
    """``[tiles, length]``: the axis position of each of a tile's first ``length`` slots along
    the axis, from the tile's start less ``pad_before`` when ``length`` is the halo's."""
    start = np.arange(at.tiles)[:, None] * at.tile
    if length == at.halo:
        start = start - at.pad_before
    return start + np.arange(length)[None, :]


def _flat_positions(rows: np.ndarray, cols: np.ndarray, height: int, width: int, slots: int):
    """``[T * slots]``: tile ``(i, j)``'s slot ``a * len(cols[j]) + b`` at position
    ``(rows[i, a], cols[j, b])`` as ``row * width + col``, or ``height * width`` (a zero
    column) where it is outside the map or past the tile's positions."""
    r = rows[:, None, :, None]
    c = cols[None, :, None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    flat = np.where(inside, r * width + c, height * width)
    flat = flat.reshape(rows.shape[0] * cols.shape[0], -1)
    out = np.full((flat.shape[0], slots), height * width, np.int32)
    out[:, : flat.shape[1]] = flat
    return out.reshape(-1)


def _tile_indices(rt: AxisTiles, ct: AxisTiles, tq: int, height: int, width: int):
    tile_index = _flat_positions(_slots(rt, rt.tile), _slots(ct, ct.tile), height, width, tq)
    map_index = np.zeros(height * width + 1, np.int32)
    map_index[tile_index] = np.arange(tile_index.size, dtype=np.int32)
    return tile_index, map_index[: height * width]


def _halo_indices(rt: AxisTiles, ct: AxisTiles, keys: int, height: int, width: int):
    return _flat_positions(_slots(rt, rt.halo), _slots(ct, ct.halo), height, width, keys)


__all__ = ["LANES", "TILE", "Layout", "layout"]
