"""The "pallas" implementation's GPU layout, for Triton (``pallas_gpu_kernel``).

The map is cut into square 8x8 query tiles; each program takes one (image, head) pair and one
tile against its halo. In XLA, heads are moved next to the batch and the tiles become
``[b*n, tiles, TQ, C]`` and the halos ``[b*n, tiles, M, C]``; Triton wants power-of-two blocks
and matmul sides of at least 16, so tiles, halos and channels are padded to them. Pallas's
Triton path needs an Ampere or newer NVIDIA GPU (and is deprecated upstream after jax 0.11; a
Mosaic GPU kernel for Hopper is its successor). On CPU the same layout runs in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sasa_jax.attention.pallas_gpu_kernel import KernelSpec, backward_kernel, forward_kernel
from sasa_jax.attention.pallas_layout import cost_estimate, halo_axis, selectors
from sasa_jax.attention.tiles import AxisTiles, query_tiles, tile_size
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

# Query tile edge: 8x8 = 64 queries a program.
TILE = 8


def _size(n: int, multiple: int = 8) -> int:
    """``n`` padded as Triton wants a block dimension: a power of two, at least ``multiple``."""
    return max(multiple, 1 << (n - 1).bit_length())


MIN_CHANNELS = 16  # Triton's matmuls want sides of at least 16


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Static tiles, halos, padded block sizes and selector tables of one geometry."""

    rows: AxisTiles
    cols: AxisTiles
    tq: int  # queries per tile, padded
    keys: int  # keys per halo, padded
    row_select: np.ndarray  # [row tiles, tq, keys] int32
    col_select: np.ndarray  # [column tiles, tq, keys] int32

    @property
    def tiles(self) -> int:
        return self.rows.tiles * self.cols.tiles

    @property
    def halos_are_tiles(self) -> bool:
        """Every key's halo is its own query tile (``block_attention``'s blocks, whose tiles
        hold whole blocks): no two halos overlap."""
        return all(
            axis.halo == axis.tile and axis.pad_before == 0 for axis in (self.rows, self.cols)
        )


@functools.lru_cache(maxsize=256)
def layout(rows_key: tuple, cols_key: tuple, tile: int) -> Layout:
    rows, cols = axis_window(*rows_key), axis_window(*cols_key)
    rt = query_tiles(rows, min(tile, rows.size))
    ct = query_tiles(cols, min(tile, cols.size))
    tq = _size(rt.tile * ct.tile)
    keys = _size(rt.halo * ct.halo, 16)
    row_select, col_select = selectors(rt, ct, tq, keys)
    return Layout(rt, ct, tq, keys, row_select, col_select)


# ---------------------------------------------------------------------------------------------
# Layout in XLA: [b, H, W, n, c] <-> tiles [b*n, tiles, tq, C] and halos [b*n, tiles, keys, C].


def _heads_first(x: Array) -> Array:
    """``[b, H, W, n, c] -> [b*n, H, W, c]``."""
    b, h, w, n, c = x.shape
    return jnp.moveaxis(x, 3, 1).reshape(b * n, h, w, c)


def _pad_channels(x: Array, channels: int) -> Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, channels - x.shape[-1])])


def _tiles(x: Array, lay: Layout, channels: int) -> Array:
    """Query tiles ``[b*n, tiles, tq, channels]`` of ``[b, H, W, n, c]`` (zeros past the map)."""
    rt, ct = lay.rows, lay.cols
    y = _heads_first(x)
    bn, h, w, c = y.shape
    y = jnp.pad(y, [(0, 0), (0, rt.tiles * rt.tile - h), (0, ct.tiles * ct.tile - w), (0, 0)])
    y = y.reshape(bn, rt.tiles, rt.tile, ct.tiles, ct.tile, c).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(bn, lay.tiles, rt.tile * ct.tile, c)
    y = jnp.pad(y, [(0, 0), (0, 0), (0, lay.tq - rt.tile * ct.tile), (0, 0)])
    return _pad_channels(y, channels)


def _untile(y: Array, lay: Layout, shape: tuple[int, ...]) -> Array:
    """The inverse of ``_tiles``: ``[b*n, tiles, tq, C] -> [b, H, W, n, c]``."""
    b, h, w, n, c = shape
    rt, ct = lay.rows, lay.cols
    y = y[:, :, : rt.tile * ct.tile, :c]
    y = y.reshape(b * n, rt.tiles, ct.tiles, rt.tile, ct.tile, c).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b * n, rt.tiles * rt.tile, ct.tiles * ct.tile, c)[:, :h, :w]
    return jnp.moveaxis(y.reshape(b, n, h, w, c), 1, 3)


def _halos(x: Array, lay: Layout, channels: int) -> Array:
    """Key (or value) halos ``[b*n, tiles, keys, channels]`` of ``[b, H, W, n, c]``."""
    y = _heads_first(x)  # [bn, H, W, c]
    y = halo_axis(y, 1, lay.rows)  # [bn, Tr, hr, W, c]
    y = halo_axis(y, 3, lay.cols)  # [bn, Tr, hr, Tc, hc, c]
    bn, c = y.shape[0], y.shape[-1]
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(bn, lay.tiles, -1, c)
    y = jnp.pad(y, [(0, 0), (0, 0), (0, lay.keys - y.shape[2]), (0, 0)])
    return _pad_channels(y, channels)


def _tables(rel_row: Array, rel_col: Array, channels: int):
    """The tables at full channel width: the row table in channels ``[0, d/2)``, the column
    table in ``[d/2, d)``; rows padded to a power of two."""
    half = rel_row.shape[1]
    out = []
    for table, start in ((rel_row, 0), (rel_col, half)):
        rows = _size(table.shape[0], 1)
        wide = jnp.zeros((rows, channels), table.dtype)
        out.append(wide.at[: table.shape[0], start : start + half].set(table))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The pallas_calls.


def _specs(lay: Layout, spec: KernelSpec, shapes: dict[str, tuple[int, ...]]):
    """BlockSpecs of the kernels' inputs, by name."""
    columns = lay.cols.tiles

    def tile_block(shape):
        return pl.BlockSpec((1, 1, *shape[2:]), lambda b, t: (b, t, 0, 0))

    specs = {
        name: tile_block(shape)
        for name, shape in shapes.items()
        if name not in ("rsel", "csel", "rr", "rc")
    }
    specs["rsel"] = pl.BlockSpec(
        (1, lay.tq, lay.keys), lambda b, t: (jax.lax.div(t, columns), 0, 0)
    )
    specs["csel"] = pl.BlockSpec(
        (1, lay.tq, lay.keys), lambda b, t: (jax.lax.rem(t, columns), 0, 0)
    )
    if spec.has_rel:
        for name in ("rr", "rc"):
            specs[name] = pl.BlockSpec(shapes[name], lambda b, t: (0, 0))
    return specs


def _call(kernel, lay, spec, interpret: bool, inputs: dict, outputs: dict):
    """``pallas_call`` over the grid (b*n, tiles) with ``inputs`` and ``outputs`` by name."""
    shapes = {name: tuple(x.shape) for name, x in inputs.items()}
    specs = _specs(lay, spec, shapes)
    out_specs = [
        pl.BlockSpec((1, 1, *s.shape[2:]), lambda b, t: (b, t, 0, 0)) for s in outputs.values()
    ]
    bn, _, tq, channels = inputs["q"].shape
    cost = cost_estimate(
        programs=bn * lay.tiles,
        queries=tq,
        keys=lay.keys,
        channels=channels,
        width=inputs["v"].shape[-1],
        has_key=spec.has_key,
        table_rows=spec.rel_rows + spec.rel_cols,
        backward=kernel is backward_kernel,
        arrays=[*inputs.values(), *outputs.values()],
    )
    return pl.pallas_call(
        functools.partial(kernel, spec=spec),
        grid=(bn, lay.tiles),
        in_specs=[specs[name] for name in inputs],
        out_specs=out_specs,
        out_shape=list(outputs.values()),
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        cost_estimate=cost,
        name=f"sasa_{kernel.__name__}",
    )(*inputs.values())


def _inputs(q_t, k_h, v_h, tables, lay):
    named = {"q": q_t}
    if k_h is not None:
        named["k"] = k_h
    named["v"] = v_h
    named["rsel"] = jnp.asarray(lay.row_select)
    named["csel"] = jnp.asarray(lay.col_select)
    if tables:
        named["rr"], named["rc"] = tables
    return named


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltr

    return pltr.CompilerParams(num_warps=4, num_stages=1)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's static layout and its operands in the kernels' layout."""

    lay: Layout
    spec: KernelSpec
    inputs: dict


def _layout(rows: AxisWindow, cols: AxisWindow) -> Layout:
    return layout(rows.spec, cols.spec, tile_size(rows, TILE))


def _prepare(q, k, v, rel_row, rel_col, rows, cols) -> _Call:
    lay = _layout(rows, cols)
    channels = _size(q.shape[-1], MIN_CHANNELS)
    channels_v = _size(v.shape[-1], MIN_CHANNELS)
    has_rel = rel_row is not None
    spec = KernelSpec(
        has_key=k is not None,
        has_rel=has_rel,
        rel_rows=rel_row.shape[0] if has_rel else 0,
        rel_cols=rel_col.shape[0] if has_rel else 0,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    tables = _tables(rel_row, rel_col, channels) if has_rel else ()
    k_h = None if k is None else _halos(k, lay, channels)
    inputs = _inputs(_tiles(q, lay, channels), k_h, _halos(v, lay, channels_v), tables, lay)
    return _Call(lay, spec, inputs)


def forward(q, k, v, rel_row, rel_col, rows, cols, *, interpret: bool = False):
    """The output ``[b, H, W, n, dv]`` and the log-sum-exp ``[b, H, W, n]``."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols)
    q_t, v_h = call.inputs["q"], call.inputs["v"]
    outputs = {
        "out": jax.ShapeDtypeStruct((*q_t.shape[:3], v_h.shape[-1]), v.dtype),
        "lse": jax.ShapeDtypeStruct((*q_t.shape[:3], 1), jnp.float32),
    }
    out, lse = _call(forward_kernel, call.lay, call.spec, interpret, call.inputs, outputs)
    lse = _untile(lse, call.lay, (*q.shape[:4], 1))[..., 0]
    return _untile(out, call.lay, v.shape), lse


def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, *, interpret=False):
    """The gradients, from the forward's output and log-sum-exp."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols)
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    inputs = dict(call.inputs)
    v_h = inputs["v"]
    inputs["do"] = _tiles(d_out.astype(v.dtype), call.lay, v_h.shape[-1])
    inputs["lse"] = _tiles(lse[..., None], call.lay, 1)
    inputs["delta"] = _tiles(delta, call.lay, 1)
    q_t = inputs["q"]
    # A query's gradient comes whole from its tile, and so does a key's when halos do not
    # overlap: those are written in the inputs' dtype. Overlapping halos add up in float32.
    disjoint = call.lay.halos_are_tiles
    outputs = {"dq": jax.ShapeDtypeStruct(q_t.shape, q.dtype)}
    if k is not None:
        outputs["dk"] = jax.ShapeDtypeStruct(inputs["k"].shape, k.dtype if disjoint else f32)
    outputs["dv"] = jax.ShapeDtypeStruct(v_h.shape, v.dtype if disjoint else f32)
    if rel_row is not None:
        for name in ("rr", "rc"):
            outputs["d" + name] = jax.ShapeDtypeStruct((*q_t.shape[:2], *inputs[name].shape), f32)
    results = _call(backward_kernel, call.lay, call.spec, interpret, inputs, outputs)
    grads = dict(zip(outputs, results, strict=True))
    lay, channels, channels_v = call.lay, q_t.shape[-1], v_h.shape[-1]
    d_v = _from_halos(grads["dv"], lay, v, channels_v)
    d_k = None if k is None else _from_halos(grads["dk"], lay, k, channels)
    _, tile_vjp = jax.vjp(lambda x: _tiles(x, lay, channels), jnp.zeros(q.shape, q.dtype))
    d_q = tile_vjp(grads["dq"])[0]
    d_row = d_col = None
    if rel_row is not None:
        half = rel_row.shape[1]
        d_row = grads["drr"].sum(axis=(0, 1))[: rel_row.shape[0], :half].astype(rel_row.dtype)
        d_col = grads["drc"].sum(axis=(0, 1))[: rel_col.shape[0], half : 2 * half]
        d_col = d_col.astype(rel_col.dtype)
    return d_q, d_k, d_v, d_row, d_col


def _from_halos(grads: Array, lay: Layout, like: Array, channels: int) -> Array:
    """Halo gradients ``[b*n, tiles, keys, channels]`` back on the map, in ``like``'s dtype:
    the transpose of the halo cut, which adds up each position's halo slots (when halos are
    the tiles, each position has one slot and nothing is added)."""
    _, halo_vjp = jax.vjp(lambda x: _halos(x, lay, channels), jnp.zeros(like.shape, grads.dtype))
    return halo_vjp(grads)[0].astype(like.dtype)


__all__ = ["TILE", "backward", "forward", "layout"]
