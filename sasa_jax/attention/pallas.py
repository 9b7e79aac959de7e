"""Exact local attention as Pallas kernels for GPU and TPU: the "pallas" implementation.

The map is cut into square query tiles (8x8 by default); each tile attends to every key of its
halo (the tile grown by the window's reach, ``tiles.query_tiles``) inside one kernel program,
with the window's membership and relative-table rows as static selector tables
(``pallas_kernel``). The work outside the kernels is layout in XLA: heads are moved next to
the batch, tiles and halos are cut out (slices, so their gradients are sums of pads), and
channels and blocks are padded as the target needs. The backward pass is a second kernel that
recomputes the weights from the saved log-sum-exp; the halos' gradients are added back by the
transpose of the halo cut.

It is the GPU and TPU lowering of the op's primitive (``dispatch``); the target follows the
lowering platform, so one trace carries all three:

- ``cuda`` (and ``rocm``): Triton, through ``jax.experimental.pallas.triton``: Ampere and
  newer NVIDIA GPUs. Triton wants power-of-two blocks and matmul sides of at least 16, so
  tiles, halos and channels are padded to them. (Pallas's Triton path is deprecated upstream
  after jax 0.11; a Mosaic GPU kernel for Hopper is the successor.)
- ``tpu``: Mosaic. Halo blocks are padded to 128 keys (the lane width of the logits); the
  channel dimension is the full array's.
- ``cpu``: the Triton layout in Pallas interpret mode -- how the tests check the kernels. It
  is slow, so "pallas" is not offered on CPU, only run when asked for by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sasa_jax.attention.api import Implementation, register
from sasa_jax.attention.dispatch import Kernel
from sasa_jax.attention.pallas_kernel import KernelSpec, backward_kernel, forward_kernel
from sasa_jax.attention.tiles import AxisTiles, query_tiles
from sasa_jax.attention.windows import BLOCKS, AxisWindow, axis_window

Array = jax.Array

# Query tile edge: 8x8 = 64 queries a program.
TILE = 8


@dataclasses.dataclass(frozen=True)
class Target:
    """How a backend wants its blocks.

    Attributes:
      name: "triton", "mosaic" or "interpret".
      power_of_two: pad every block dimension to a power of two (Triton).
      min_channels: pad channels to at least this (Triton's matmuls need 16).
      key_multiple: pad the halo's keys to a multiple of this (128 on TPU: the logits' lanes).
      interpret: run in Pallas interpret mode (CPU).
    """

    name: str
    power_of_two: bool
    min_channels: int
    key_multiple: int
    interpret: bool = False


TRITON = Target("triton", power_of_two=True, min_channels=16, key_multiple=16)
MOSAIC = Target("mosaic", power_of_two=False, min_channels=1, key_multiple=128)
# Interpret mode checks the layout GPUs run (the tests switch it to MOSAIC's too).
INTERPRET = dataclasses.replace(TRITON, name="interpret", interpret=True)


def _size(n: int, target: Target, multiple: int = 8) -> int:
    """``n`` padded as ``target`` wants a block dimension (at least a multiple of 8)."""
    if target.power_of_two:
        return max(multiple, 1 << (n - 1).bit_length())
    return -(-n // multiple) * multiple


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


def _selectors(rt: AxisTiles, ct: AxisTiles, tq: int, keys: int):
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


@functools.lru_cache(maxsize=256)
def layout(rows_key: tuple, cols_key: tuple, tile: int, target: Target) -> Layout:
    rows, cols = axis_window(*rows_key), axis_window(*cols_key)
    rt = query_tiles(rows, min(tile, rows.size))
    ct = query_tiles(cols, min(tile, cols.size))
    tq = _size(rt.tile * ct.tile, target)
    keys = _size(rt.halo * ct.halo, target, target.key_multiple)
    row_select, col_select = _selectors(rt, ct, tq, keys)
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


def _halo_axis(y: Array, axis: int, at: AxisTiles) -> Array:
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


def _halos(x: Array, lay: Layout, channels: int) -> Array:
    """Key (or value) halos ``[b*n, tiles, keys, channels]`` of ``[b, H, W, n, c]``."""
    y = _heads_first(x)  # [bn, H, W, c]
    y = _halo_axis(y, 1, lay.rows)  # [bn, Tr, hr, W, c]
    y = _halo_axis(y, 3, lay.cols)  # [bn, Tr, hr, Tc, hc, c]
    bn, c = y.shape[0], y.shape[-1]
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(bn, lay.tiles, -1, c)
    y = jnp.pad(y, [(0, 0), (0, 0), (0, lay.keys - y.shape[2]), (0, 0)])
    return _pad_channels(y, channels)


def _tables(rel_row: Array, rel_col: Array, channels: int, target: Target):
    """The tables at full channel width: the row table in channels ``[0, d/2)``, the column
    table in ``[d/2, d)``; rows padded as the target wants."""
    half = rel_row.shape[1]
    out = []
    for table, start in ((rel_row, 0), (rel_col, half)):
        rows = _size(table.shape[0], target, 1) if target.power_of_two else table.shape[0]
        wide = jnp.zeros((rows, channels), table.dtype)
        out.append(wide.at[: table.shape[0], start : start + half].set(table))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The pallas_calls.


def _compiler_params(target: Target):
    if target.name == "triton":
        from jax.experimental.pallas import triton as pltr

        return pltr.CompilerParams(num_warps=4, num_stages=1)
    if target.name == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return None


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


def _call(kernel, lay, spec, target, inputs: dict, outputs: dict):
    """``pallas_call`` over the grid (b*n, tiles) with ``inputs`` and ``outputs`` by name."""
    shapes = {name: tuple(x.shape) for name, x in inputs.items()}
    specs = _specs(lay, spec, shapes)
    out_specs = [
        pl.BlockSpec((1, 1, *s.shape[2:]), lambda b, t: (b, t, 0, 0)) for s in outputs.values()
    ]
    bn = inputs["q"].shape[0]
    return pl.pallas_call(
        functools.partial(kernel, spec=spec),
        grid=(bn, lay.tiles),
        in_specs=[specs[name] for name in inputs],
        out_specs=out_specs,
        out_shape=list(outputs.values()),
        interpret=target.interpret,
        compiler_params=_compiler_params(target),
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


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's static layout and its operands in the kernels' layout."""

    lay: Layout
    spec: KernelSpec
    target: Target
    inputs: dict


def _target(platform: str) -> Target:
    """Triton on CUDA and ROCm, Mosaic on TPU, interpret mode on CPU (read at call time)."""
    return {"cuda": TRITON, "rocm": TRITON, "tpu": MOSAIC}.get(platform, INTERPRET)


def _prepare(q, k, v, rel_row, rel_col, rows: AxisWindow, cols: AxisWindow, platform) -> _Call:
    target = _target(platform)
    tile = TILE
    if rows.border == BLOCKS:  # tiles of whole blocks: each is its own halo
        tile = rows.window * max(1, TILE // rows.window)
    lay = layout(rows.spec, cols.spec, tile, target)
    dim, dim_v = q.shape[-1], v.shape[-1]
    channels = _size(dim, target, target.min_channels) if target.power_of_two else dim
    channels_v = _size(dim_v, target, target.min_channels) if target.power_of_two else dim_v
    has_rel = rel_row is not None
    spec = KernelSpec(
        has_key=k is not None,
        has_rel=has_rel,
        rel_rows=rel_row.shape[0] if has_rel else 0,
        rel_cols=rel_col.shape[0] if has_rel else 0,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    tables = _tables(rel_row, rel_col, channels, target) if has_rel else ()
    k_h = None if k is None else _halos(k, lay, channels)
    inputs = _inputs(_tiles(q, lay, channels), k_h, _halos(v, lay, channels_v), tables, lay)
    return _Call(lay, spec, target, inputs)


def forward(q, k, v, rel_row, rel_col, rows, cols, platform):
    """The output ``[b, H, W, n, dv]`` and the log-sum-exp ``[b, H, W, n]``."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols, platform)
    q_t, v_h = call.inputs["q"], call.inputs["v"]
    outputs = {
        "out": jax.ShapeDtypeStruct((*q_t.shape[:3], v_h.shape[-1]), v.dtype),
        "lse": jax.ShapeDtypeStruct((*q_t.shape[:3], 1), jnp.float32),
    }
    out, lse = _call(forward_kernel, call.lay, call.spec, call.target, call.inputs, outputs)
    lse = _untile(lse, call.lay, (*q.shape[:4], 1))[..., 0]
    return _untile(out, call.lay, v.shape), lse


def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform):
    """The gradients, from the forward's output and log-sum-exp."""
    call = _prepare(q, k, v, rel_row, rel_col, rows, cols, platform)
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    inputs = dict(call.inputs)
    v_h = inputs["v"]
    inputs["do"] = _tiles(d_out.astype(v.dtype), call.lay, v_h.shape[-1])
    inputs["lse"] = _tiles(lse[..., None], call.lay, 1)
    inputs["delta"] = _tiles(delta, call.lay, 1)
    q_t = inputs["q"]
    outputs = {"dq": jax.ShapeDtypeStruct(q_t.shape, f32)}
    if k is not None:
        outputs["dk"] = jax.ShapeDtypeStruct(inputs["k"].shape, f32)
    outputs["dv"] = jax.ShapeDtypeStruct(v_h.shape, f32)
    if rel_row is not None:
        for name in ("rr", "rc"):
            outputs["d" + name] = jax.ShapeDtypeStruct((*q_t.shape[:2], *inputs[name].shape), f32)
    results = _call(backward_kernel, call.lay, call.spec, call.target, inputs, outputs)
    grads = dict(zip(outputs, results, strict=True))
    # The halos' gradients go back to the map through the transpose of the halo cut.
    lay, channels, channels_v = call.lay, q_t.shape[-1], v_h.shape[-1]
    _, halo_vjp = jax.vjp(lambda x: _halos(x, lay, channels_v), jnp.zeros(v.shape, f32))
    d_v = halo_vjp(grads["dv"])[0]
    d_k = None
    if k is not None:
        _, halo_vjp = jax.vjp(lambda x: _halos(x, lay, channels), jnp.zeros(k.shape, f32))
        d_k = halo_vjp(grads["dk"])[0].astype(k.dtype)
    _, tile_vjp = jax.vjp(lambda x: _tiles(x, lay, channels), jnp.zeros(q.shape, f32))
    d_q = tile_vjp(grads["dq"])[0]
    d_row = d_col = None
    if rel_row is not None:
        half = rel_row.shape[1]
        d_row = grads["drr"].sum(axis=(0, 1))[: rel_row.shape[0], :half].astype(rel_row.dtype)
        d_col = grads["drc"].sum(axis=(0, 1))[: rel_col.shape[0], half : 2 * half]
        d_col = d_col.astype(rel_col.dtype)
    return d_q.astype(q.dtype), d_k, d_v.astype(v.dtype), d_row, d_col


register(
    Implementation(
        "pallas",
        kernel=Kernel(forward, backward),
        available=lambda backend: backend in ("gpu", "tpu"),
        callable_on=("cpu",),
    )
)

__all__ = ["INTERPRET", "MOSAIC", "TILE", "TRITON", "backward", "forward", "layout"]
