"""The public local-attention op: argument checking and dispatch to an implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sasa_jax.attention import dispatch, registry
from sasa_jax.attention.dtypes import softmax_dtype
from sasa_jax.attention.registry import (
    BACKENDS,
    Implementation,
    add_auto_rule,
    attention_implementations,
    auto_choice,
    register,
    registered,
)
from sasa_jax.attention.windows import BLOCKS, BORDERS, axis_window, rel_length

Array = jax.Array


def _attend(name: str, q, k, v, rel_row, rel_col, rows, cols, return_weights: bool):
    """Runs checked arguments: through the op's primitive when every backend's choice has a
    kernel, else by a direct call; the weights from ``fn`` or from "gather"."""
    impl = registry.registered(name)
    if impl.kernel is None or (return_weights and impl.fn is not None):
        return impl.fn(q, k, v, rel_row, rel_col, rows, cols, return_weights)
    choices = registry.choices(name, q.shape, rows, cols)
    if any(registry.registered(c).kernel is None for c in choices.values()):
        here = registry.registered(choices[jax.default_backend()])
        return here.fn(q, k, v, rel_row, rel_col, rows, cols, return_weights)
    out = dispatch.attention(q, k, v, rel_row, rel_col, rows, cols, choices, requested=name)
    if not return_weights:
        return out
    weights = registry.registered("gather").fn(q, k, v, rel_row, rel_col, rows, cols, True)[1]
    return out, weights


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return pair


def _check_shapes(q: Array, k: Array | None, v: Array) -> None:
    if q.ndim != 5:
        raise ValueError(
            f"q must be [batch, height, width, heads, dim], got shape {tuple(q.shape)}"
        )
    if k is not None and tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 5 or tuple(v.shape[:4]) != tuple(q.shape[:4]):
        raise ValueError(
            "v must be [batch, height, width, heads, dim_v] with q's first four dimensions "
            f"{tuple(q.shape[:4])}, got {tuple(v.shape)}"
        )


def _check_rel(rel: Array | None, name: str, window: int, border: str, dim: int) -> None:
    if rel is None:
        return
    if dim % 2:
        raise ValueError(
            f"{name} needs an even dim, so q splits into row and column halves; got dim={dim}"
        )
    expected = (rel_length(window, border), dim // 2)
    if tuple(rel.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} for window {window} and border {border!r}, "
            f"got {tuple(rel.shape)}"
        )


def _check_tables(
    rel_row, rel_col, window: tuple[int, int], border: str, dim: int, has_keys: bool
) -> None:
    if (rel_row is None) != (rel_col is None):
        raise ValueError("give both rel_row and rel_col, or neither")
    if not has_keys and rel_row is None:
        raise ValueError("k=None (logits q·r alone) needs rel_row and rel_col")
    _check_rel(rel_row, "rel_row", window[0], border, dim)
    _check_rel(rel_col, "rel_col", window[1], border, dim)


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int of at least 1, got {value!r}")


def _check_border(border: str, window: tuple[int, int], dilation: int, image: tuple[int, int]):
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if border != "clamp":
        return
    if dilation != 1:
        raise ValueError(f"border 'clamp' needs dilation 1, got dilation={dilation}")
    if window[0] > image[0] or window[1] > image[1]:
        raise ValueError(
            f"border 'clamp' needs a window no larger than the image: window {window}, "
            f"image {image}"
        )


def _implementation(name: str) -> Implementation:
    if name not in registry.names():
        raise ValueError(f"implementation must be one of {registry.names()}, got {name!r}")
    backend = jax.default_backend()
    impl = registry.registered(name)
    if not impl.available(backend) and backend not in impl.callable_on:
        raise ValueError(
            f"implementation {name!r} does not run on backend {backend!r}; "
            f"available: {attention_implementations(backend)}"
        )
    return impl


def local_attention(
    q: Array,
    k: Array | None,
    v: Array,
    *,
    window: int | Sequence[int],
    rel_row: Array | None = None,
    rel_col: Array | None = None,
    dilation: int = 1,
    border: str = "mask",
    implementation: str = "auto",
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """2-D local self-attention with relative-position logits (SASA, eq. 2-3).

    Args:
      q: ``[batch, height, width, heads, dim]`` queries (the op does no scaling).
      k: ``[batch, height, width, heads, dim]`` keys, or None: the logits are then the
        relative term alone (the paper's Table 6 "q·r"; needs the tables), with no q·k work.
      v: ``[batch, height, width, heads, dim_v]`` values.
      window: ``k`` or ``(kh, kw)``, each at least 1.
      rel_row: ``[kh, dim/2]`` (``[2kh-1, dim/2]`` for border "clamp") row-offset embeddings,
        shared across heads. Give both tables or neither.
      rel_col: ``[kw, dim/2]`` (``[2kw-1, dim/2]`` for "clamp") column-offset embeddings.
      dilation: step between window taps, at least 1 ("clamp" needs 1).
      border: "mask", "zeros" or "clamp"; see the README for the exact semantics.
      implementation: a name from ``attention_implementations()``. All return the same numbers
        (to float rounding); "auto" picks the fastest for the backend and shape
        (``auto_choice``).
      return_weights: also return the attention weights.

    Returns:
      ``[batch, height, width, heads, dim_v]`` in v's dtype; with ``return_weights``, also the
      weights ``[batch, height, width, heads, kh*kw]`` in the softmax dtype (float32 for bf16
      and f16 inputs), window taps in row-major order (row tap ``t``, column tap ``u`` at
      ``t*kw + u``). Taps outside the image have weight 0 under "mask".

    Raises:
      ValueError: for any inconsistent argument, before anything is traced or compiled.
    """
    _check_shapes(q, k, v)
    window = _pair(window, "window")
    _positive_int(dilation, "dilation")
    image = (q.shape[1], q.shape[2])
    _check_border(border, window, dilation, image)
    _check_tables(rel_row, rel_col, window, border, q.shape[-1], k is not None)
    _implementation(implementation)
    rows = axis_window(image[0], window[0], dilation, border)
    cols = axis_window(image[1], window[1], dilation, border)
    return _attend(implementation, q, k, v, rel_row, rel_col, rows, cols, return_weights)


def to_blocks(x: Array, block: int) -> Array:
    """``[b, H, W, ...] -> [b*(H/s)*(W/s), s, s, ...]`` for block size s (row-major blocks)."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // block, block, w // block, block, *rest)
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape(-1, block, block, *rest)


def from_blocks(x: Array, image: tuple[int, int, int]) -> Array:
    """The inverse of ``to_blocks`` for ``image = (b, H, W)``."""
    b, h, w = image
    block = x.shape[1]
    rest = x.shape[3:]
    x = x.reshape(b, h // block, w // block, block, block, *rest)
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape(b, h, w, *rest)


def block_attention(
    q: Array,
    k: Array | None,
    v: Array,
    *,
    block: int,
    rel_row: Array | None = None,
    rel_col: Array | None = None,
    implementation: str = "auto",
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention inside non-overlapping ``block x block`` tiles (the attention stem, eq. 4-7).

    Every query attends to every position of its own tile, with relative logits for offsets in
    ``[-(block-1), block-1]``: the numbers of ``local_attention(..., window=block,
    border="clamp")`` run on each tile as an image of its own. The kernels ("native",
    "pallas", "tiled") run on the whole map with each query's window its own block; "gather"
    and "dense" run on the tiles cut out as images.

    Args:
      q, k: ``[batch, height, width, heads, dim]``, height and width multiples of ``block``;
        ``k`` may be None as for ``local_attention``.
      v: ``[batch, height, width, heads, dim_v]``.
      block: the tile size, at least 1.
      rel_row, rel_col: ``[2*block-1, dim/2]`` each, or both None.
      implementation: as ``local_attention``'s; "auto" picks per platform for the tiles' shape.
      return_weights: also return the weights, ``[tiles, block, block, heads, block*block]``
        with the tiles in ``to_blocks`` order.

    Returns:
      ``[batch, height, width, heads, dim_v]`` (and the weights).

    Raises:
      ValueError: for any inconsistent argument, before anything is traced or compiled.
    """
    _check_shapes(q, k, v)
    _positive_int(block, "block")
    image = (q.shape[1], q.shape[2])
    if image[0] % block or image[1] % block:
        raise ValueError(f"height and width must be multiples of block={block}, got {image}")
    _check_tables(rel_row, rel_col, (block, block), "clamp", q.shape[-1], k is not None)
    _implementation(implementation)
    tile = axis_window(block, block, 1, "clamp")
    if implementation in ("gather", "dense"):  # on the tiles, each an image of its own
        tiles = [None if t is None else to_blocks(t, block) for t in (q, k, v)]
        result = _attend(implementation, *tiles, rel_row, rel_col, tile, tile, return_weights)
        out, weights = result if return_weights else (result, None)
        out = from_blocks(out, tuple(q.shape[:3]))
        return (out, weights) if return_weights else out
    # On the whole map: a block is a window that starts at the block's start.
    rows = axis_window(image[0], block, 1, BLOCKS)
    cols = axis_window(image[1], block, 1, BLOCKS)
    tiles_shape = (q.shape[0] * (image[0] // block) * (image[1] // block), block, block)
    choices = registry.choices(implementation, tiles_shape + tuple(q.shape[3:]), tile, tile)
    # "dense" on the whole map would attend across blocks; "tiled" with block-sized tiles
    # is exactly dense attention per block.
    choices = {b: "tiled" if c in ("dense", "gather") else c for b, c in choices.items()}
    out = dispatch.attention(
        q, k, v, rel_row, rel_col, rows, cols, choices, requested=implementation, blocks=True
    )
    if not return_weights:
        return out
    tiles = [None if t is None else to_blocks(t, block) for t in (q, k, v)]
    weights = registry.registered("gather").fn(*tiles, rel_row, rel_col, tile, tile, True)[1]
    return out, weights


register(Implementation("auto", kernel=registry.Kernel(None, None)))

__all__ = [
    "BACKENDS",
    "Implementation",
    "add_auto_rule",
    "attention_implementations",
    "auto_choice",
    "block_attention",
    "from_blocks",
    "local_attention",
    "register",
    "registered",
    "softmax_dtype",
    "to_blocks",
]
