"""The "pallas" implementation's TPU layout: positions in the lanes (``pallas_tpu_kernel``).

The map is cut into query tiles of 8x16 positions (128 queries, one vreg row) and, for each,
the halo of keys its windows reach (``tiles.query_tiles``). In XLA the tiles become
``[b, tiles, heads, C, TQ]`` and the halos ``[b, tiles, heads, C, M]``, with ``TQ`` and ``M``
padded to multiples of 128: the last dimension of every array the kernels read or write is a
wide one, so TPU's (8, 128) tiling pads little (an 8-channel head as the last dimension would
be padded 16x, in HBM and in VMEM). One program takes one tile of one image with every head.
The halos' gradients go back to the map through the transpose of the halo cut.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sasa_jax.attention.pallas_layout import cost_estimate
from sasa_jax.attention.pallas_tpu_kernel import (
    BACKWARD_INPUTS,
    FORWARD_INPUTS,
    TpuSpec,
    backward_kernel,
    forward_kernel,
)
from sasa_jax.attention.pallas_tpu_layout import TILE, Layout, layout

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Layout in XLA: [b, H, W, n, c] <-> tiles [b, T, n, c, TQ] and halos [b, T, n, c, M].


def _flat(x: Array) -> Array:
    """``[b, H, W, n, c] -> [b, n*c, H*W]``: positions last, dense on TPU."""
    b, h, w, n, c = x.shape
    return jnp.swapaxes(x.reshape(b, h * w, n * c), 1, 2)


def _flat_rows(values: Array, dtype) -> Array:
    """Per-query float32 values ``[b, H, W, n]`` as ``[b, n*k, H*W]`` of ``dtype``: their bits
    in ``k = 4 / itemsize`` channels, to ride with a map of ``dtype`` through one gather."""
    b, h, w, n = values.shape
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), dtype)
    bits = bits.reshape(b, h * w, n, -1)  # [b, HW, n, k]
    return bits.transpose(0, 2, 3, 1).reshape(b, -1, h * w)


def _rows_from_bits(bits: Array) -> Array:
    """The inverse of ``_flat_rows`` on any leading shape: ``[..., n*k, P]`` -> float32
    ``[..., n, P]``."""
    k = 4 // jnp.dtype(bits.dtype).itemsize
    bits = bits.reshape(*bits.shape[:-2], -1, k, bits.shape[-1])
    bits = jnp.moveaxis(bits, -2, -1)
    return jax.lax.bitcast_convert_type(bits if k > 1 else bits[..., 0], jnp.float32)


def _gather(flats: list[Array], index: np.ndarray, slots: int, heads: int) -> list[Array]:
    """Slots ``index`` of maps ``[b, C_i, H*W]`` (one gather for all; ``H*W`` and past: zeros)
    as ``[b, T, heads, C_i / heads, slots]``."""
    both = jnp.pad(jnp.concatenate(flats, axis=1), [(0, 0), (0, 0), (0, 1)])
    y = jnp.take(both, jnp.asarray(index), axis=2, mode="clip")
    out, start = [], 0
    for flat in flats:
        part = y[:, start : start + flat.shape[1]]
        start += flat.shape[1]
        b, channels = part.shape[:2]
        part = part.reshape(b, heads, channels // heads, -1, slots)
        out.append(part.transpose(0, 3, 1, 2, 4))
    return out


def tiles(x: Array, lay: Layout) -> Array:
    """Query tiles ``[b, T, n, c, TQ]`` of ``[b, H, W, n, c]`` (zeros past the map)."""
    return _gather([_flat(x)], lay.tile_index, lay.tq, x.shape[3])[0]


def _unflat(y: Array) -> Array:
    """Tiles ``[b, T, n, c, TQ] -> [b, n*c, T*TQ]``."""
    b, t, n, c, tq = y.shape
    return y.transpose(0, 2, 3, 1, 4).reshape(b, n * c, t * tq)


def _untake(flat: Array, lay: Layout) -> Array:
    """``[b, C, T*TQ]`` tile slots back in map order, ``[b, C, H*W]``."""
    return jnp.take(flat, jnp.asarray(lay.map_index), axis=2, mode="clip")


def _to_map(flat: Array, shape: tuple[int, ...]) -> Array:
    """``[b, n*c, H*W] -> [b, H, W, n, c]``."""
    return jnp.swapaxes(flat, 1, 2).reshape(shape)


def untile(y: Array, lay: Layout, shape: tuple[int, ...]) -> Array:
    """The inverse of ``tiles``: ``[b, T, n, c, TQ] -> [b, H, W, n, c]``."""
    return _to_map(_untake(_unflat(y[:, :, :, : shape[4]]), lay), shape)


def halos(x: Array, lay: Layout) -> Array:
    """Key (or value) halos ``[b, T, n, c, M]`` of ``[b, H, W, n, c]`` (zeros outside)."""
    return _gather([_flat(x)], lay.halo_index, lay.keys, x.shape[3])[0]


def wide_tables(rel_row: Array, rel_col: Array, channels: int) -> tuple[Array, Array]:
    """The tables transposed at full channel width, ``[C, L]``: the row table in channels
    ``[0, d/2)``, the column table in ``[d/2, d)``, zeros elsewhere."""
    half = rel_row.shape[1]
    out = []
    for table, start in ((rel_row, 0), (rel_col, half)):
        wide = jnp.zeros((channels, table.shape[0]), table.dtype)
        out.append(wide.at[start : start + half].set(table.T))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The pallas_calls.


def _grid(lay: Layout, images: int) -> tuple[tuple[int, int], Callable]:
    """The grid, and the (tile, image) of a program's ids. The tiles outermost and the images
    innermost, so that a tile's selectors (``[M, TQ]`` int32 each, larger than a head's keys)
    are copied into VMEM once for all its images, not once a program: a pipeline copies a
    block again only when its index changes. With one tile there is nothing to keep, and the
    images go first, so that the leading parallel axis is not one long."""
    if lay.tiles > 1:
        return (lay.tiles, images), lambda i, j: (i, j)
    return (images, lay.tiles), lambda i, j: (j, i)


def _specs(lay: Layout, shapes: dict, at: Callable) -> dict[str, pl.BlockSpec]:
    """BlockSpecs of the kernels' inputs by name; ``at`` gives a program's (tile, image)."""
    columns = lay.cols.tiles
    specs = {}
    for name, shape in shapes.items():
        if name == "rsel":
            specs[name] = pl.BlockSpec(
                (1, *shape[1:]), lambda *ids: (jax.lax.div(at(*ids)[0], columns), 0, 0)
            )
        elif name == "csel":
            specs[name] = pl.BlockSpec(
                (1, *shape[1:]), lambda *ids: (jax.lax.rem(at(*ids)[0], columns), 0, 0)
            )
        elif name in ("rr", "rc"):
            specs[name] = pl.BlockSpec(shape, lambda *ids: (0, 0))
        else:
            specs[name] = _block(shape, at)
    return specs


def _block(shape: tuple[int, ...], at: Callable) -> pl.BlockSpec:
    """One (image, tile) block of a ``[b, T, ...]`` array."""
    rest = len(shape) - 2

    def index(*ids):
        tile, image = at(*ids)
        return (image, tile) + (0,) * rest

    return pl.BlockSpec((1, 1, *shape[2:]), index)


def _cost(kernel, lay: Layout, spec: TpuSpec, inputs: dict, outputs: dict) -> pl.CostEstimate:
    b, tiles, heads, channels, _ = inputs["q"].shape
    return cost_estimate(
        programs=b * tiles * heads,
        queries=lay.tq,
        keys=lay.keys,
        channels=channels,
        width=inputs["v"].shape[3],
        has_key=spec.has_key,
        table_rows=spec.rel_rows + spec.rel_cols,
        backward=kernel is backward_kernel,
        arrays=[*inputs.values(), *outputs.values()],
    )


def kernel_call(
    kernel,
    lay: Layout,
    spec: TpuSpec,
    inputs: dict,
    outputs: dict,
    interpret: bool,
    name: str = "sasa_tpu",
):
    """``pallas_call`` over the grid of (tile, image) pairs (``_grid``) with ``inputs`` and
    ``outputs`` by name, named ``{name}_{kernel's name}``."""
    from jax.experimental.pallas import tpu as pltpu

    grid, at = _grid(lay, inputs["q"].shape[0])
    specs = _specs(lay, {name: tuple(x.shape) for name, x in inputs.items()}, at)
    return pl.pallas_call(
        functools.partial(kernel, spec=spec),
        grid=grid,
        in_specs=[specs[name] for name in inputs],
        out_specs=[_block(s.shape, at) for s in outputs.values()],
        out_shape=list(outputs.values()),
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=_cost(kernel, lay, spec, inputs, outputs),
        name=f"{name}_{kernel.__name__}",
    )(*inputs.values())


@dataclasses.dataclass(frozen=True)
class _Prepared:
    lay: Layout
    spec: TpuSpec
    inputs: dict


def prepared(lay: Layout, q_t: Array, k_h, v_h: Array, rel_row, rel_col) -> _Prepared:
    """The kernels' spec and forward inputs from q's tiles ``[b, T, n, c, TQ]``, k's and v's
    halos ``[b, T, n, c, M]`` (k may be None) and the tables ``[L, c/2]`` (or None)."""
    has_rel = rel_row is not None
    spec = TpuSpec(
        heads=q_t.shape[2],
        has_key=k_h is not None,
        has_rel=has_rel,
        rel_rows=rel_row.shape[0] if has_rel else 0,
        rel_cols=rel_col.shape[0] if has_rel else 0,
        precision=jax.lax.Precision.HIGHEST if q_t.dtype == jnp.float32 else None,
    )
    inputs = {"q": q_t}
    if k_h is not None:
        inputs["k"] = k_h
    inputs["v"] = v_h
    inputs["rsel"] = jnp.asarray(lay.row_select)
    inputs["csel"] = jnp.asarray(lay.col_select)
    if has_rel:
        inputs["rr"], inputs["rc"] = wide_tables(rel_row, rel_col, q_t.shape[3])
    assert tuple(inputs) == tuple(n for n in FORWARD_INPUTS if n in inputs)
    return _Prepared(lay, spec, inputs)


def _prepare(q, k, v, rel_row, rel_col, rows, cols) -> _Prepared:
    lay = layout(rows.spec, cols.spec)
    k_h = None if k is None else halos(k, lay)
    return prepared(lay, tiles(q, lay), k_h, halos(v, lay), rel_row, rel_col)


def forward(q, k, v, rel_row, rel_col, rows, cols, *, interpret: bool = False):
    """The output ``[b, H, W, n, dv]`` and the log-sum-exp ``[b, H, W, n]``."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols)
    q_t, v_h = call.inputs["q"], call.inputs["v"]
    b, t, n = q_t.shape[:3]
    outputs = {
        "out": jax.ShapeDtypeStruct((b, t, n, v_h.shape[3], call.lay.tq), v.dtype),
        "lse": jax.ShapeDtypeStruct((b, t, n, call.lay.tq), jnp.float32),
    }
    out, lse = kernel_call(forward_kernel, call.lay, call.spec, call.inputs, outputs, interpret)
    # The log-sum-exp's bits ride with the output's channels through one gather.
    lse_bits = jax.lax.bitcast_convert_type(lse, v.dtype)  # [b, T, n, TQ(, k)]
    lse_bits = lse_bits.reshape(b, t, n, call.lay.tq, -1).transpose(0, 2, 4, 1, 3)
    lse_bits = lse_bits.reshape(b, -1, t * call.lay.tq)  # [b, n*k, T*TQ]
    width = v.shape[3] * v.shape[4]
    flat = _untake(jnp.concatenate([_unflat(out), lse_bits], axis=1), call.lay)
    lse = _rows_from_bits(flat[:, width:])  # [b, n, HW]
    return _to_map(flat[:, :width], v.shape), jnp.swapaxes(lse, 1, 2).reshape(q.shape[:4])


def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, *, interpret=False):
    """The gradients, from the forward's output and log-sum-exp."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols)
    lay, f32 = call.lay, jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
    # The log-sum-exps' and deltas' bits ride with dO's channels through one gather.
    flats = [_flat(d_out.astype(v.dtype)), _flat_rows(lse, v.dtype), _flat_rows(delta, v.dtype)]
    d_out_t, lse_t, delta_t = _gather(flats, lay.tile_index, lay.tq, q.shape[3])
    inputs = {
        **call.inputs,
        "do": d_out_t,
        "lse": _rows_from_bits(lse_t.reshape(*lse_t.shape[:2], -1, lay.tq)),
        "delta": _rows_from_bits(delta_t.reshape(*delta_t.shape[:2], -1, lay.tq)),
    }
    assert tuple(inputs) == tuple(n for n in BACKWARD_INPUTS if n in inputs)
    q_t, v_h = inputs["q"], inputs["v"]
    b, t = q_t.shape[:2]
    # A query's gradient comes whole from its tile, and so does a key's when halos do not
    # overlap: those are written in the inputs' dtype. Overlapping halos add up in float32.
    disjoint = lay.halos_are_tiles
    outputs = {"dq": jax.ShapeDtypeStruct(q_t.shape, q.dtype)}
    if k is not None:
        outputs["dk"] = jax.ShapeDtypeStruct(inputs["k"].shape, k.dtype if disjoint else f32)
    outputs["dv"] = jax.ShapeDtypeStruct(v_h.shape, v.dtype if disjoint else f32)
    if rel_row is not None:
        for name in ("rr", "rc"):
            outputs["d" + name] = jax.ShapeDtypeStruct((b, t, *inputs[name].shape), f32)
    results = kernel_call(backward_kernel, lay, call.spec, inputs, outputs, interpret)
    grads = dict(zip(outputs, results, strict=True))
    d_v = _from_halos(grads["dv"], lay, v)
    d_k = None if k is None else _from_halos(grads["dk"], lay, k)
    d_q = untile(grads["dq"], lay, q.shape)
    d_row = d_col = None
    if rel_row is not None:
        d_row, d_col = table_grads(grads["drr"], grads["drc"], rel_row.shape[1])
        d_row, d_col = d_row.astype(rel_row.dtype), d_col.astype(rel_col.dtype)
    return d_q, d_k, d_v, d_row, d_col


def table_grads(drr: Array, drc: Array, half: int) -> tuple[Array, Array]:
    """The tables' gradients ``[L, half]`` (float32) from the backward kernel's per-tile
    shares of the wide tables ``[b, T, C, L]``: summed, each table's channels taken back."""
    d_row = drr.sum(axis=(0, 1))[:half].T
    d_col = drc.sum(axis=(0, 1))[half : 2 * half].T
    return d_row, d_col


def _from_halos(grads: Array, lay: Layout, like: Array) -> Array:
    """Halo gradients ``[b, T, n, c, M]`` back on the map, in ``like``'s dtype: the transpose
    of the halo cut (each position's halo slots added up), or, when halos are the tiles, their
    inverse permutation."""
    if lay.halos_are_tiles:
        return untile(grads, lay, like.shape)
    _, halo_vjp = jax.vjp(lambda x: halos(x, lay), jnp.zeros(like.shape, grads.dtype))
    return halo_vjp(grads)[0].astype(like.dtype)


__all__ = [
    "TILE",
    "backward",
    "forward",
    "halos",
    "kernel_call",
    "layout",
    "prepared",
    "table_grads",
    "tiles",
    "untile",
    "wide_tables",
]
