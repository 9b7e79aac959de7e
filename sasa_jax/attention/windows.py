"""Static geometry of the local-attention window along one spatial axis.

The geometry is plain NumPy computed from static shapes, so implementations can build their
index tables and masks at trace time. A 2-D window is the product of a row window and a column
window: a tap is in a query's softmax when its row tap and its column tap are
(``AxisWindow.member``), and ``tap_weights`` maps an implementation's weights to the op's
per-tap layout.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

BORDERS = ("mask", "zeros", "clamp")

# Not a border of ``local_attention``: the geometry of ``block_attention``, where the axis is cut
# into blocks of ``window`` positions and each query's taps are its own block's positions.
BLOCKS = "blocks"


@dataclasses.dataclass(frozen=True)
class AxisWindow:
    """The window of every query along one axis of length ``size``.

    Attributes:
      size: number of positions along the axis (height or width).
      window: window extent k along the axis.
      dilation: step between window taps.
      border: one of ``BORDERS``, or ``BLOCKS``.
      pad_before: zero rows to prepend so that tap ``t`` of query ``i`` is padded index
        ``start[i] + dilation * t``.
      pad_after: zero rows to append.
      start: ``[size]`` int, first tap of each query in padded coordinates.
      position: ``[size, window]`` int, the tap positions in image coordinates (may be
        outside ``[0, size)`` for ``mask`` and ``zeros``).
      valid: ``[size, window]`` bool, tap inside the image.
      rel_index: ``[size, window]`` int, the row of the relative table each tap reads.
      rel_length: the length the relative table must have.
    """

    size: int
    window: int
    dilation: int
    border: str
    pad_before: int
    pad_after: int
    start: np.ndarray
    position: np.ndarray
    valid: np.ndarray
    rel_index: np.ndarray
    rel_length: int

    @property
    def spec(self) -> tuple[int, int, int, str]:
        """``(size, window, dilation, border)``: ``axis_window(*spec)`` rebuilds this window;
        a hashable key for caching tables built from it."""
        return (self.size, self.window, self.dilation, self.border)

    @property
    def centred(self) -> bool:
        """True when every query's window is the same shift of the query (no clamping)."""
        return self.border not in ("clamp", BLOCKS)

    @property
    def member(self) -> np.ndarray:
        """``[size, window]`` bool: the tap takes part in the softmax. Every tap under
        "zeros" (a tap outside the image is a zero key and value); otherwise the taps inside
        the image. Every implementation masks by this table."""
        return np.ones_like(self.valid) if self.border == "zeros" else self.valid


def rel_length(window: int, border: str) -> int:
    """Length of the relative-position table along an axis of window extent ``window``."""
    return 2 * window - 1 if border in ("clamp", BLOCKS) else window


def _first_tap(size: int, window: int, border: str) -> np.ndarray:
    """``[size]``: where each query's window starts when it does not follow the query: the
    window nearest the centre that fits ("clamp"), or the query's block (``BLOCKS``)."""
    if border == BLOCKS:
        if size % window:
            raise ValueError(f"blocks of {window} do not tile an axis of {size}")
        return np.arange(size) // window * window
    return np.clip(np.arange(size) - window // 2, 0, size - window)


def axis_window(size: int, window: int, dilation: int, border: str) -> AxisWindow:
    """Computes the window geometry of one axis. See ``local_attention`` for the semantics."""
    queries = np.arange(size)[:, None]
    taps = np.arange(window)[None, :]
    if border in ("clamp", BLOCKS):
        first = _first_tap(size, window, border)
        position = first[:, None] + taps
        rel_index = position - queries + (window - 1)
        pad_before = pad_after = 0
        start = first
    else:
        position = queries + dilation * (taps - window // 2)
        rel_index = np.broadcast_to(taps, (size, window))
        pad_before = dilation * (window // 2)
        pad_after = dilation * (window - 1 - window // 2)
        start = np.arange(size)
    valid = (position >= 0) & (position < size)
    return AxisWindow(
        size=size,
        window=window,
        dilation=dilation,
        border=border,
        pad_before=pad_before,
        pad_after=pad_after,
        start=start.astype(np.int32),
        position=position.astype(np.int32),
        valid=valid,
        rel_index=np.ascontiguousarray(rel_index, dtype=np.int32),
        rel_length=rel_length(window, border),
    )


def tap_weights(
    weights,
    row_slot: np.ndarray,
    col_slot: np.ndarray,
    slots_per_row: int,
    rows: AxisWindow,
    cols: AxisWindow,
):
    """Per-tap weights ``[b, H, W, h, kh*kw]`` (row-major taps, 0 for non-members) from an
    implementation's own weights layout ``[b, H', W', h, S]`` (``H' >= H``, ``W' >= W``).

    Tap ``(t, u)`` of query ``(i, j)`` is slot ``row_slot[i, t] * slots_per_row +
    col_slot[j, u]`` of ``weights[:, i, j]``; ``row_slot`` is ``[H, kh]``, ``col_slot``
    ``[W, kw]``. Non-member taps (``AxisWindow.member``) are 0.
    """
    grid = weights[:, : rows.size, : cols.size]
    flat = row_slot[:, None, :, None] * slots_per_row + col_slot[None, :, None, :]
    flat = flat.reshape(rows.size, cols.size, 1, -1)
    picked = jnp.take_along_axis(grid, jnp.asarray(flat)[None], axis=-1)
    member = rows.member[:, None, :, None] & cols.member[None, :, None, :]
    return jnp.where(jnp.asarray(member.reshape(rows.size, cols.size, 1, -1)), picked, 0)
