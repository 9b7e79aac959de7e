"""The attention stem as one C++ kernel for XLA's CPU backend (``cpu_stem_kernel.cc``).

The stem projects a few input channels (1 or 3) to ``heads * c`` (16 at the cluttered digits'
width, 64 at ImageNet's), so on the map its q, k and v, and their gradients, are each that
many times the input's size; moving them costs the CPU more than the attention itself does
(docs/performance.md). Here each ``block x block`` tile is projected, attended over and
written in one pass: the kernel reads ``x`` and the weights and writes the output and each
query's log-sum-exp, and its backward pass recomputes the tile's projections and weights and
writes ``dx`` and each image's share of the weights' gradients (summed here, so the numbers do
not depend on the number of threads). The numbers are ``block_attention``'s on the projected
maps, as ``stem_tpu.stem_attention``'s are on TPU.

It is built with the "native" kernel (``native_build``) and offered where that one is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax._src import core
from jax._src.interpreters import mlir

from sasa_jax.attention import native, native_build
from sasa_jax.attention.dispatch import define, differentiable
from sasa_jax.attention.per_device import per_device

Array = jax.Array

# The largest block the kernel is compiled for, and the widest head it takes.
MAX_BLOCK = 8
MAX_HEAD = 64

# The work items a call aims for: each group of 8 images is cut into bands of its rows of
# blocks until there are this many (or one band a row), so that a small batch keeps every core
# busy. Fixed rather than the machine's core count, so the numbers do not depend on the machine.
MIN_ITEMS = 16


def bands(batch: int, height: int, block: int) -> int:
    """How many bands of its rows of blocks each group of 8 images is cut into (1 to the
    rows of blocks ``height // block``)."""
    groups = -(-batch // 8)
    return max(1, min(height // block, -(-MIN_ITEMS // groups)))


def available() -> bool:
    """Whether the kernel is offered here: on a CPU host where the "native" kernel is."""
    return native.available("cpu")


@dataclasses.dataclass(frozen=True)
class Static:
    """What the kernel is compiled for (the primitives' static parameter)."""

    heads: int
    block: int


stem_native_p = core.Primitive("sasa_stem_native")
stem_native_p.multiple_results = True
stem_native_bwd_p = core.Primitive("sasa_stem_native_bwd")
stem_native_bwd_p.multiple_results = True


def _forward_abstract(x, wq, wk, wv, rel_row, rel_col, *, static: Static):
    return (
        core.ShapedArray((*x.shape[:3], wq.shape[1]), jnp.float32),
        core.ShapedArray((*x.shape[:3], static.heads), jnp.float32),
    )


def _backward_abstract(x, wq, wk, wv, rel_row, rel_col, lse, d_out, *, static: Static):
    return tuple(core.ShapedArray(a.shape, jnp.float32) for a in (x, wq, wk, wv, rel_row, rel_col))


def _forward(x, wq, wk, wv, rel_row, rel_col, *, static: Static):
    """The output and the log-sum-exp, from each query's largest logit and its sum of
    ``exp(logit - largest)``."""
    out, per_query = _forward_abstract(x, wq, wk, wv, rel_row, rel_col, static=static)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (out, per_query, per_query)]
    out, top, total = jax.ffi.ffi_call(native_build.STEM_FORWARD_TARGET, shapes)(
        x, wq, wk, wv, rel_row, rel_col, **_attributes(x, static)
    )
    return [out, top + jnp.log(total)]


def _attributes(x, static: Static) -> dict:
    """The custom calls' attributes for an input ``x`` of this device's images."""
    count = bands(x.shape[0], x.shape[1], static.block)
    return {"heads": static.heads, "block": static.block, "bands": count}


def _backward(x, wq, wk, wv, rel_row, rel_col, lse, d_out, *, static: Static):
    """The gradients; the weights' as each (band, image) share, summed here."""
    attributes = _attributes(x, static)
    lead = (attributes["bands"], x.shape[0])
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32)] + [
        jax.ShapeDtypeStruct((*lead, *a.shape), jnp.float32) for a in (wq, wk, wv, rel_row, rel_col)
    ]
    dx, *shares = jax.ffi.ffi_call(native_build.STEM_BACKWARD_TARGET, shapes)(
        x, wq, wk, wv, rel_row, rel_col, d_out, lse, **attributes
    )
    return [dx, *(share.sum(axis=(0, 1)) for share in shares)]


def _rule(fn):
    """The lowering rule of a pass: the kernel on each device's images (``per_device``)."""

    def rule(ctx, *args, static: Static):
        if native_build.library() is None:  # built (or loaded) here; a warning said why not
            raise RuntimeError("the native stem kernel could not be built; see the warning")
        lowered = per_device(ctx, functools.partial(fn, static=static))
        return mlir.lower_fun(lowered, multiple_results=True)(ctx, *args)

    return {"cpu": rule}


define(stem_native_p, _forward_abstract, _rule(_forward), outputs=2)
define(stem_native_bwd_p, _backward_abstract, _rule(_backward), outputs=6)


# The backward pass takes the log-sum-exp, not the output.
_stem = differentiable(stem_native_p, stem_native_bwd_p, slice(1, None))


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
) -> Array:
    """Attention in each ``block x block`` tile of ``x`` with q, k and v projected from it, as
    ``stem_tpu.stem_attention``: ``q = (x @ wq) / sqrt(c)``, ``k = x @ wk``, ``v`` = ``x`` times
    its position's value matrix, then ``block_attention``'s numbers, computed in float32.

    Args:
      x: ``[b, H, W, cin]``, H and W multiples of ``block``.
      wq, wk: ``[cin, heads*c]``, ``c`` even.
      wv: ``[block*block*cin, heads*c]``: for position ``(a, b)`` of the block, rows
        ``(a*block + b)*cin`` on.
      rel_row, rel_col: ``[2*block-1, c/2]``.
      heads: the number of heads (of at most ``MAX_HEAD`` channels); block: the tile's side,
        1 to ``MAX_BLOCK``.

    Returns:
      ``[b, H, W, heads*c]`` in ``x``'s dtype. Lowered for CPU only.

    Raises:
      ValueError: for inconsistent shapes, before anything is traced.
    """
    cin, width = wq.shape
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be 1 to {MAX_BLOCK}, got {block}")
    if x.ndim != 4 or x.shape[3] != cin or x.shape[1] % block or x.shape[2] % block:
        raise ValueError(
            f"x must be [b, H, W, {cin}] with H and W multiples of {block}, got {x.shape}"
        )
    if heads < 1 or width % heads or (width // heads) % 2 or width // heads > MAX_HEAD:
        raise ValueError(
            f"wq's {width} columns must make {heads} heads of an even width of at most {MAX_HEAD}"
        )
    c = width // heads
    expected = {
        "wk": (wk.shape, (cin, width)),
        "wv": (wv.shape, (block * block * cin, width)),
        "rel_row": (rel_row.shape, (2 * block - 1, c // 2)),
        "rel_col": (rel_col.shape, (2 * block - 1, c // 2)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} must be {want}, got {tuple(got)}")
    f32 = jnp.float32
    args = (x, wq * jnp.asarray(c**-0.5, wq.dtype), wk, wv, rel_row, rel_col)
    out = _stem(tuple(a.astype(f32) for a in args), Static(heads, block))
    return out.astype(x.dtype)


__all__ = ["MAX_BLOCK", "MAX_HEAD", "MIN_ITEMS", "available", "bands", "stem_attention"]
