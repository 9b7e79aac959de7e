"""Layout pieces both Pallas targets share: the selector tables of a tile against its halo,
and cutting the halos out of a map in XLA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sasa_jax.attention.tiles import AxisTiles

Array = jax.Array


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n``."""
    return -(-n // multiple) * multiple


def selectors(rt: AxisTiles, ct: AxisTiles, tq: int, keys: int):
    """``[tiles, tq, keys]`` per axis: the relative-table row of (query, halo key) along that
    axis, or -1 where the key is outside the query's softmax. Padding queries see key 0."""
    th, tw, hr, hc = rt.tile, ct.tile, rt.halo, ct.halo
    rows = np.broadcast_to(rt.rel[:, :, None, :, None], (rt.tiles, th, tw, hr, hc))
    cols = np.broadcast_to(ct.rel[:, None, :, None, :], (ct.tiles, th, tw, hr, hc))
    out = []
    for table in (rows, cols):
        padded = np.full((table.shape[0], tq, keys), -1, np.int32)
        padded[:, : th * tw, : hr * hc] = table.reshape(table.shape[0], th * tw, hr * hc)
        padded[:, th * tw :, 0] = 0
        out.append(padded)
    return out


def halo_axis(y: Array, axis: int, at: AxisTiles) -> Array:
    """Cuts the halos along ``axis``: ``[..., size, ...] -> [..., tiles, halo, ...]``, from
    ``ceil(halo/tile)`` shifted views of the axis in blocks of ``tile`` (zeros outside)."""
    size = y.shape[axis]
    spans = math.ceil(at.halo / at.tile)
    length = (at.tiles + spans - 1) * at.tile
    pads = [(0, 0)] * y.ndim
    pads[axis] = (at.pad_before, max(0, length - at.pad_before - size))
    y = jax.lax.slice_in_dim(jnp.pad(y, pads), 0, length, axis=axis)
    blocks = y.reshape(*y.shape[:axis], at.tiles + spans - 1, at.tile, *y.shape[axis + 1 :])
    views = [jax.lax.slice_in_dim(blocks, s, s + at.tiles, axis=axis) for s in range(spans)]
    halos = jnp.concatenate(views, axis=axis + 1)
    return jax.lax.slice_in_dim(halos, 0, at.halo, axis=axis + 1)


def cost_estimate(
    *,
    programs: int,
    queries: int,
    keys: int,
    channels: int,
    width: int,
    has_key: bool,
    table_rows: int,
    backward: bool,
    arrays: list,
) -> pl.CostEstimate:
    """XLA's cost model's view of a kernel: ``programs`` (query tile, head) pairs, each with
    ``queries x keys`` logits from ``channels``-wide q·k (when ``has_key``) and ``table_rows``
    q·table products, and a ``width``-wide weighted sum of values; the backward pass
    recomputes the forward and adds three products of the same size. Bytes: every array
    read or written once."""
    per_program = queries * (keys * (channels * has_key + width) + table_rows * channels)
    flops = 2 * programs * per_program * (2.5 if backward else 1.0)
    moved = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.CostEstimate(
        flops=int(flops), transcendentals=programs * queries * keys, bytes_accessed=moved
    )
