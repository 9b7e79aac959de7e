"""The attention stem's attention on TPU, its projections done in the kernel's tile layout.

``block_attention`` takes q, k and v as maps: on TPU each is then cut into the kernel's tiles
(``pallas_tpu``: a gather of a ``[b, n*c, H*W]`` copy), and the backward pass cuts the maps
again and puts the gradients back on the map. The stem's input has a few channels (3 for
RGB), so here the input is cut into tiles once and q, k and the values are formed from its
tiles, in the forward pass and again in the backward pass: no full-resolution q, k or v map,
nor its copies, is made or kept. Each block is its own tile's halo (the stem's 4x4 blocks lie
inside the 8x16 tiles), and each lane of a tile is one position of the map, so a position's
spatially-aware value matrix (eq. 8-9) is the same for that lane in every tile.

``stem_attention(x, wq, wk, wv, rel_row, rel_col, heads=..., block=...)`` is two primitives
under a ``custom_vjp``, lowered for TPU (the Mosaic kernels) and CPU (the same kernels in
Pallas's interpret mode, for tests), each under ``per_device`` over several devices.
``nn.StemAttention`` takes it on TPU through ``lax.platform_dependent``.

With ``tiled=True`` the output stays in the kernel's tiles ``[b, T, heads, c, TQ]`` (and its
gradient arrives there): ``models.AttentionStem`` then takes its batch norm's statistics
(``tile_moments``) and its max pool (``tile_block_max``) on the tiles, so that only the
pooled map leaves them. On TPU a map whose last dimension is 64 channels is laid out padded
to 128 lanes; the tiles have positions in their lanes and are not padded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import mlir

from sasa_jax.attention import maxima, pallas_tpu
from sasa_jax.attention.dispatch import define, differentiable
from sasa_jax.attention.pallas_tpu_kernel import backward_kernel, forward_kernel
from sasa_jax.attention.per_device import per_device
from sasa_jax.attention.windows import BLOCKS, axis_window

Array = jax.Array

# The kernels' names here (``sasa_tpu_stem_forward_kernel``, ``..._backward_kernel``).
KERNEL_NAME = "sasa_tpu_stem"


@dataclasses.dataclass(frozen=True)
class _Grid:
    """A ``height x width`` map of ``block x block`` blocks cut into the TPU layout's tiles:
    the layout, each lane's place in its block, and the blocks pooled out of the tiles."""

    height: int
    width: int
    block: int

    @functools.cached_property
    def lay(self) -> pallas_tpu.Layout:
        rows = axis_window(self.height, self.block, 1, BLOCKS)
        cols = axis_window(self.width, self.block, 1, BLOCKS)
        return pallas_tpu.layout(rows.spec, cols.spec)

    def lane_positions(self) -> np.ndarray | None:
        """``[TQ]``: each lane's position inside its block, ``row % block * block + col %
        block``, the same in every tile (lanes past the map hold zeros: position 0); None
        where tiles start off the blocks' grid, so that a lane's position varies."""
        lay = self.lay
        index = np.asarray(lay.tile_index).reshape(lay.tiles, lay.tq)
        rows, cols = index // self.width % self.block, index % self.width % self.block
        inside = index < self.height * self.width
        positions = np.where(inside, rows * self.block + cols, -1)
        first = positions.max(axis=0)  # each lane's position where it is inside the map
        if np.any((positions != first[None]) & inside):
            return None
        return np.maximum(first, 0)

    @property
    def per_tile(self) -> tuple[int, int]:
        """Blocks in a tile, down and across."""
        return self.lay.rows.tile // self.block, self.lay.cols.tile // self.block

    def inside(self) -> np.ndarray:
        """``[T, TQ]``: lanes that hold a position of the map."""
        lay = self.lay
        return np.asarray(lay.tile_index).reshape(lay.tiles, lay.tq) < self.height * self.width

    def lanes(self) -> tuple[np.ndarray, np.ndarray]:
        """``[TQ]`` each: a lane's block in its tile (row-major) and its place in that block
        (``row * block + column``); -1 for both past the tile's positions (padding)."""
        cols, k = self.lay.cols.tile, self.block
        lane = np.arange(self.lay.tq)
        block = lane // cols // k * self.per_tile[1] + lane % cols // k
        place = lane // cols % k * k + lane % cols % k
        used = lane < self.lay.rows.tile * cols
        return tuple(np.where(used, a, -1).astype(np.int32) for a in (block, place))

    def blocks(self, y: Array) -> Array:
        """``[..., TQ] -> [..., rows of blocks, block, columns of blocks, block]``."""
        down, across = self.per_tile
        used = self.lay.rows.tile * self.lay.cols.tile
        return y[..., :used].reshape(*y.shape[:-1], down, self.block, across, self.block)

    def to_map(self, p: Array) -> Array:
        """Per-tile block values ``[b, T, n, c, blocks]`` -> ``[b, H/block, W/block, n*c]``."""
        b, _, n, c, _ = p.shape
        (down, across), lay = self.per_tile, self.lay
        p = p.reshape(b, lay.rows.tiles, lay.cols.tiles, n, c, down, across)
        p = p.transpose(0, 1, 5, 2, 6, 3, 4)
        p = p.reshape(b, lay.rows.tiles * down, lay.cols.tiles * across, n * c)
        return p[:, : self.height // self.block, : self.width // self.block]


@dataclasses.dataclass(frozen=True)
class Static:
    """One call's static parameters: heads, the block, the map's size, the query scale."""

    heads: int
    block: int
    height: int
    width: int
    scale: float
    tiled: bool = False  # the output (and its gradient) in the kernel's tiles, not the map

    @property
    def grid(self) -> _Grid:
        return _Grid(self.height, self.width, self.block)


def fits(height: int, width: int, block: int) -> bool:
    """Whether ``stem_attention`` takes a ``height x width`` map of ``block x block`` blocks:
    the TPU layout's tiles must start on the blocks' grid. They hold whole blocks
    (``tiles.tile_size``), so they do whenever the map is a whole number of blocks; checked
    here rather than assumed. Blocks of at most 32 positions (5x5)."""
    if height % block or width % block:
        return False
    grid = _Grid(height, width, block)
    whole = grid.lay.rows.tile % block == 0 and grid.lay.cols.tile % block == 0
    # a bit per place of a block in tile_block_max's gradient
    return whole and block * block <= maxima.MAX_PLACES and grid.lane_positions() is not None


def _input_tiles(x: Array, lay: pallas_tpu.Layout) -> Array:
    """The input's tiles ``[b, T, cin, TQ]`` of ``x`` ``[b, H, W, cin]``."""
    return pallas_tpu.tiles(x[:, :, :, None, :], lay)[:, :, 0]


def _projections(x_t: Array, wq: Array, wk: Array, wv: Array, static: Static):
    """q, k and v tiles ``[b, T, heads, c, TQ]`` from the input's tiles ``[b, T, cin, TQ]``:
    ``wq``, ``wk`` ``[cin, heads*c]``, ``wv`` ``[block*block*cin, heads*c]`` (one value
    matrix per position of the block)."""
    cin, width = wq.shape
    c = width // static.heads
    dtype = x_t.dtype
    scale = jnp.asarray(static.scale, dtype)
    q = jnp.einsum("btiq,ihc->bthcq", x_t, wq.astype(dtype).reshape(cin, static.heads, c))
    k = jnp.einsum("btiq,ihc->bthcq", x_t, wk.astype(dtype).reshape(cin, static.heads, c))
    lanes = wv.astype(dtype).reshape(-1, cin, static.heads, c)[static.grid.lane_positions()]
    v = jnp.einsum("btiq,qihc->bthcq", x_t, lanes)
    return q * scale, k, v


def _forward(x, wq, wk, wv, rel_row, rel_col, *, static: Static, interpret: bool):
    """``[out map [b, H, W, heads*c], out tiles [b, T, heads, c, TQ], lse [b, T, heads, TQ]]``."""
    lay = static.grid.lay
    x_t = _input_tiles(x, lay)
    q, k, v = _projections(x_t, wq, wk, wv, static)
    call = pallas_tpu.prepared(lay, q, k, v, rel_row.astype(x.dtype), rel_col.astype(x.dtype))
    b, t, n, c, tq = q.shape
    outputs = {
        "out": jax.ShapeDtypeStruct((b, t, n, c, tq), x.dtype),
        "lse": jax.ShapeDtypeStruct((b, t, n, tq), jnp.float32),
    }
    out_t, lse_t = pallas_tpu.kernel_call(
        forward_kernel, lay, call.spec, call.inputs, outputs, interpret, name=KERNEL_NAME
    )
    if static.tiled:
        return [out_t, out_t, lse_t]
    out = pallas_tpu.untile(out_t, lay, (b, *x.shape[1:3], n, c))
    return [out.reshape(*x.shape[:3], n * c), out_t, lse_t]


def _backward(x, wq, wk, wv, rel_row, rel_col, out_t, lse_t, d_out, *, static, interpret):
    """The gradients of x, wq, wk, wv and the tables (each in its input's dtype)."""
    lay = static.grid.lay
    dtype = x.dtype
    x_t = _input_tiles(x, lay)
    (q, k, v), project_vjp = jax.vjp(lambda *a: _projections(*a, static), x_t, wq, wk, wv)
    call = pallas_tpu.prepared(lay, q, k, v, rel_row.astype(dtype), rel_col.astype(dtype))
    b, t, n, c, tq = q.shape
    if static.tiled:
        d_out_t = d_out.astype(dtype)
    else:
        d_out_t = pallas_tpu.tiles(d_out.reshape(*x.shape[:3], n, c).astype(dtype), lay)
    f32 = jnp.float32
    delta = jnp.sum(d_out_t.astype(f32) * out_t.astype(f32), axis=3)
    inputs = {**call.inputs, "do": d_out_t, "lse": lse_t, "delta": delta}
    table = (b, t, *inputs["rr"].shape)
    outputs = {
        "dq": jax.ShapeDtypeStruct(q.shape, dtype),  # each key in one tile: nothing adds up
        "dk": jax.ShapeDtypeStruct(k.shape, dtype),
        "dv": jax.ShapeDtypeStruct(v.shape, dtype),
        "drr": jax.ShapeDtypeStruct(table, f32),
        "drc": jax.ShapeDtypeStruct(table, f32),
    }
    dq, dk, dv, drr, drc = pallas_tpu.kernel_call(
        backward_kernel, lay, call.spec, inputs, outputs, interpret, name=KERNEL_NAME
    )
    dx_t, dwq, dwk, dwv = project_vjp((dq, dk, dv))
    dx = pallas_tpu.untile(dx_t[:, :, None], lay, (*x.shape[:3], 1, x.shape[3]))
    d_row, d_col = pallas_tpu.table_grads(drr, drc, rel_row.shape[1])
    grads = (dx.reshape(x.shape), dwq, dwk, dwv, d_row, d_col)
    likes = (x, wq, wk, wv, rel_row, rel_col)
    return [g.astype(p.dtype) for g, p in zip(grads, likes, strict=True)]


stem_p = core.Primitive("sasa_stem_attention")
stem_p.multiple_results = True
stem_bwd_p = core.Primitive("sasa_stem_attention_bwd")
stem_bwd_p.multiple_results = True


def _forward_abstract(x, wq, wk, wv, rel_row, rel_col, *, static: Static):
    lay = static.grid.lay
    b, n = x.shape[0], static.heads
    c = wq.shape[1] // n
    tiles = jax.core.ShapedArray((b, lay.tiles, n, c, lay.tq), x.dtype)
    return (
        tiles if static.tiled else jax.core.ShapedArray((*x.shape[:3], n * c), x.dtype),
        tiles,
        jax.core.ShapedArray((b, lay.tiles, n, lay.tq), jnp.float32),
    )


def _backward_abstract(x, wq, wk, wv, rel_row, rel_col, out_t, lse_t, d_out, *, static):
    return tuple(jax.core.ShapedArray(a.shape, a.dtype) for a in (x, wq, wk, wv, rel_row, rel_col))


def _rules(fn) -> dict:
    """Lowering rules of a pass: the Mosaic kernels on TPU, interpreted on CPU (tests)."""

    def rule(ctx, *args, static: Static, interpret: bool):
        lowered = per_device(ctx, functools.partial(fn, static=static, interpret=interpret))
        return mlir.lower_fun(lowered, multiple_results=True)(ctx, *args)

    return {
        "tpu": functools.partial(rule, interpret=False),
        "cpu": functools.partial(rule, interpret=True),
    }


define(stem_p, _forward_abstract, _rules(_forward), outputs=3)
define(stem_bwd_p, _backward_abstract, _rules(_backward), outputs=6)


# The backward pass takes the output tiles and log-sum-exps, not the output on the map.
_stem = differentiable(stem_p, stem_bwd_p, slice(1, None))


def stem_attention(
    x: Array,
    wq: Array,
    wk: Array,
    wv: Array,
    rel_row: Array,
    rel_col: Array,
    *,
    heads: int,
    block: int,
    tiled: bool = False,
) -> Array:
    """Attention in each ``block x block`` tile of ``x`` with q, k and v projected from it:
    ``q = (x @ wq) / sqrt(c)``, ``k = x @ wk``, ``v`` = ``x`` times its position's value
    matrix; the numbers of ``block_attention`` on those maps.

    Args:
      x: ``[b, H, W, cin]``, H and W multiples of ``block``; the compute dtype.
      wq, wk: ``[cin, heads*c]``.
      wv: ``[block*block*cin, heads*c]``: for position ``(a, b)`` of the block, rows
        ``(a*block + b)*cin`` on (eq. 8's mixed value matrix there).
      rel_row, rel_col: ``[2*block-1, c/2]``.

    Returns:
      ``[b, H, W, heads*c]`` in ``x``'s dtype, or with ``tiled`` the kernel's output tiles
      ``[b, T, heads, c, TQ]`` (``tile_moments`` and ``tile_block_max`` read them).
      Lowered for TPU (and for CPU in interpret mode); on other platforms there is no
      lowering.
    """
    cin, width = wq.shape
    if x.ndim != 4 or x.shape[3] != cin or x.shape[1] % block or x.shape[2] % block:
        raise ValueError(
            f"x must be [b, H, W, {cin}] with H and W multiples of {block}, got {x.shape}"
        )
    if not fits(x.shape[1], x.shape[2], block):
        raise ValueError(f"the TPU layout's tiles do not start on the {block}x{block} blocks' grid")
    if width % heads or wv.shape != (block * block * cin, width):
        raise ValueError(f"wv must be {(block * block * cin, width)}, got {wv.shape}")
    c = width // heads
    static = Static(heads, block, x.shape[1], x.shape[2], c**-0.5, tiled)
    return _stem((x, wq, wk, wv, rel_row, rel_col), static)


def layout(height: int, width: int, block: int) -> pallas_tpu.Layout:
    """The TPU layout's tiles of a ``height x width`` map of ``block x block`` blocks."""
    return _Grid(height, width, block).lay


def tile_moments(y_t: Array, height: int, width: int, block: int) -> Array:
    """``[2, n*c]`` float32: each channel's mean and mean square over the map's positions, of
    the output tiles ``y_t`` ``[b, T, n, c, TQ]`` of a ``height x width`` map (``tiled=True``).
    """
    grid = _Grid(height, width, block)
    inside = jnp.asarray(grid.inside())[None, :, None, None, :]
    y = jnp.where(inside, y_t.astype(jnp.float32), 0.0)
    count = y_t.shape[0] * height * width
    n, c = y_t.shape[2:4]
    mean = jnp.sum(y, axis=(0, 1, 4)).reshape(n * c) / count
    mean_sq = jnp.sum(y * y, axis=(0, 1, 4)).reshape(n * c) / count
    return jnp.stack([mean, mean_sq])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max(y_t: Array, grid: _Grid) -> Array:
    return jnp.max(grid.blocks(y_t), axis=(-3, -1)).reshape(*y_t.shape[:-1], -1)


def _block_max_fwd(y_t: Array, grid: _Grid):
    return _block_max(y_t, grid), y_t


def _block_max_bwd(grid: _Grid, y_t: Array, g: Array):
    """Each block's gradient split equally among its maxima, as ``jnp.max``'s (the map path's
    ``nn.block_max`` on CPU and GPU): the stem's outputs tie in every block while its queries
    are zero (``zero_query``). The maxima and their places come out of one reduction
    (``attention.maxima``), not a comparison of values XLA may have computed twice."""
    block, place = grid.lanes()
    kind = maxima.bits_type(grid.block**2)
    bits = jnp.asarray(maxima.place_bits(place, kind))
    lanes = jax.lax.broadcast_in_dim(bits, y_t.shape, (y_t.ndim - 1,))
    axes = (y_t.ndim, y_t.ndim + 2)
    _, held = maxima.block_maxima(grid.blocks(y_t), grid.blocks(lanes), axes)
    held = held.reshape(*y_t.shape[:-1], -1)  # [b, T, n, c, blocks]: bits of each max
    count = jax.lax.population_count(held).astype(jnp.float32)
    owner = jnp.asarray(np.maximum(block, 0))
    share = jnp.take(g.astype(jnp.float32) / count, owner, axis=-1)
    winner = (jnp.take(held, owner, axis=-1) & bits) != 0
    return (jnp.where(winner, share, 0.0).astype(g.dtype),)


_block_max.defvjp(_block_max_fwd, _block_max_bwd)


def tile_block_max(y_t: Array, height: int, width: int, block: int) -> Array:
    """``[b, H/block, W/block, n*c]``: the max over each ``block x block`` block of the map
    whose output tiles are ``y_t`` ``[b, T, n, c, TQ]`` (``tiled=True``), without laying the
    map out. In the backward pass a block's gradient is split equally among its maxima, as
    ``jnp.max``'s. Every tile holds whole blocks (``fits``)."""
    grid = _Grid(height, width, block)
    p = _block_max(y_t, grid)
    return grid.to_map(p)


__all__ = [
    "KERNEL_NAME",
    "fits",
    "layout",
    "stem_attention",
    "stem_bwd_p",
    "stem_p",
    "tile_block_max",
    "tile_moments",
]
