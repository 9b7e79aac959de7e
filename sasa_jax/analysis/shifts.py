"""How a model answers its input moved by less than its stem's stride.

A stem that reduces the image by 4 meets a digit at 16 phases against its grid. Two
measurements of what that costs:

- ``stem_shift_change(model, images)``: how far the stem's output moves when the image moves
  by 1, 2 or 3 pixels, ``sum_i |f(T x_i) - f(x_i)| / sum_i |f(x_i)|`` (overlapping windows
  should move it a little; non-overlapping tiles, by our reading, more), and after a move by
  the whole stride with the output moved back by one cell (what is left comes from the
  border: every stem here is equivariant on its own grid).
- ``phase_consistency(model, images, labels)``: how often the model's answer stays the same
  over the stride x stride phases (Zhang, "Making Convolutional Networks Shift-Invariant
  Again", 2019, measures the like on ImageNet), and its top-1 at the best and worst phase.

``python -m sasa_jax.diagnose --workdir=DIR --shift_images=256`` prints both for a run's
checkpoints, on its test images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_jax.analysis.diagnostics import stem_of, train_mode

MARGIN = 2  # cells left out at each border: those a stem's padding, or the fill, reaches


def shifted(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """``images [b, H, W, C]`` moved down by ``dy`` and right by ``dx`` pixels (``0 <= dy < H``,
    ``0 <= dx < W``). The rows and columns it vacates take each channel's minimum over the
    batch: black, for normalised images on a black background such as the digits'."""
    images = jnp.asarray(images)
    _, height, width, _ = images.shape
    if not (0 <= dy < height and 0 <= dx < width):
        raise ValueError(f"a shift of ({dy}, {dx}) pixels does not fit {height}x{width} images")
    fill = jnp.broadcast_to(images.min(axis=(0, 1, 2)), images.shape)
    return fill.at[:, dy:, dx:].set(images[:, : height - dy, : width - dx])


def _interior(x: np.ndarray) -> np.ndarray:
    return x[:, MARGIN:-MARGIN, MARGIN:-MARGIN]


def _relative(moved: np.ndarray, base: np.ndarray) -> float:
    """``sum_i |moved_i - base_i| / sum_i |base_i|`` over the images ``i`` (leading axis)."""
    flat = (moved - base).reshape(len(base), -1), base.reshape(len(base), -1)
    size = np.linalg.norm(flat[1], axis=1).sum()
    return float(np.linalg.norm(flat[0], axis=1).sum() / size) if size > 0 else 0.0


def _unexplained(base: np.ndarray, moved: np.ndarray) -> float:
    """The share of the interior of ``moved [b, h, w, c]``'s variance that one linear map (and
    a bias) of each cell's 3x3 neighbourhood in ``base`` does not explain, the map shared by
    all cells: least squares on the even images, the share measured on the odd ones. Near 0
    when the move is a smooth resampling of ``base``; near 1 when ``moved`` is a new code."""
    _, h, w, c = base.shape
    rows = range(MARGIN, h - MARGIN)
    cols = range(MARGIN, w - MARGIN)
    hood = np.concatenate(
        [
            base[:, rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        axis=-1,
    )
    x = np.concatenate([hood, np.ones(hood.shape[:-1] + (1,))], -1)
    y = _interior(moved)
    fit, _, _, _ = np.linalg.lstsq(x[::2].reshape(-1, x.shape[-1]), y[::2].reshape(-1, c))
    held_x, held_y = x[1::2].reshape(-1, x.shape[-1]), y[1::2].reshape(-1, c)
    spread = np.sum(np.square(held_y - held_y.mean(0)))
    return float(np.sum(np.square(held_y - held_x @ fit)) / spread) if spread > 0 else 0.0


def _check_enough(count: int, cells: int, channels: int) -> None:
    """``_unexplained`` fits ``9 * channels + 1`` numbers per channel on half the images:
    it needs 4 samples (cells of the fitted images) per number, and cells to fit on."""
    needed = 4 * (9 * channels + 1)
    if cells < 1 or (count + 1) // 2 * cells < needed:
        fit = -(-needed // max(cells, 1))
        raise ValueError(
            f"the shift measurements need at least {2 * fit} images at this size ({cells} "
            f"inner cells of {channels} channels each), not {count}: raise --shift_images"
            if cells >= 1
            else f"the stem's output is too small for the shift measurements ({MARGIN} "
            "cells are left out at each border): use larger images"
        )


def _stem_out_shape(stem: nnx.Module, images: jax.Array) -> tuple[int, ...]:
    """The stem's output shape ``[1, h, w, c]`` on one of ``images``, traced (in eval mode,
    batch norm reads its statistics: tracing the shape moves nothing)."""
    return jax.eval_shape(lambda x: stem(x), images[:1]).shape


def stem_stride(model: nnx.Module, images: jax.Array) -> int | None:
    """How many input rows ``images [b, H, W, 3]`` give per row of the model's stem output
    (``H // h``); None for a model without a stem. Leaves the model in eval mode."""
    stem = stem_of(model)
    if stem is None:
        return None
    model.eval()
    return images.shape[1] // _stem_out_shape(stem, images)[1]


def stem_shift_change(
    model: nnx.Module, images: jax.Array, pixels=(1, 2, 3)
) -> dict[str, float] | None:
    """How the stem's output ``[b, h, w, c]`` changes when normalised ``images [b, H, W, 3]``
    move by each of ``pixels`` (the mean of a move down and a move right), on the
    cells ``MARGIN`` or more from the border: ``"stem_shift_P"``, its relative change
    (``_relative``), and ``"stem_shift_P_unexplained"``, the share of it no local linear map
    of the unmoved output explains (``_unexplained``); and ``"stem_shift_cell"``, the relative
    change after a move by the stem's stride ``H // h`` down and right with the output moved
    back by one cell. One train-mode pass holds the images and all their moved copies, so
    every copy is normalised with the same batch statistics, as the first stage sees it in
    training; the model's batch statistics are left as they were, and it is left in eval
    mode. None for a model without a stem; a ``ValueError`` before anything runs when the
    images are too few to fit the linear map on, or the output too small to leave a border."""
    stem = stem_of(model)
    if stem is None:
        return None
    model.eval()
    _, h, w, c = _stem_out_shape(stem, images)
    _check_enough(images.shape[0], (h - 2 * MARGIN) * (w - 2 * MARGIN), c)
    stride = images.shape[1] // h
    moves = [(p, 0) for p in pixels] + [(0, p) for p in pixels] + [(stride, stride)]
    batch = jnp.concatenate([images] + [shifted(images, dy, dx) for dy, dx in moves])
    with train_mode(model):
        out = nnx.jit(lambda s, x: s(x))(stem, batch)
    out = np.asarray(out, np.float64).reshape(len(moves) + 1, *(images.shape[:1] + out.shape[1:]))
    base, inside = out[0], _interior(out[0])
    change = {}
    for i, p in enumerate(pixels):
        down, right = out[1 + i], out[1 + len(pixels) + i]
        change[f"stem_shift_{p}"] = (
            _relative(_interior(down), inside) + _relative(_interior(right), inside)
        ) / 2
        change[f"stem_shift_{p}_unexplained"] = (
            _unexplained(base, down) + _unexplained(base, right)
        ) / 2
    change["stem_shift_cell"] = _relative(
        _interior(out[-1][:, 1:, 1:]), _interior(base[:, :-1, :-1])
    )
    return change


def phase_consistency(
    model: nnx.Module,
    images: jax.Array,
    labels: np.ndarray | None = None,
    stride: int | None = None,
) -> dict[str, float] | None:
    """The classifier's answers on normalised ``images [b, H, W, 3]`` at each of the
    ``stride x stride`` phases (moved down by ``dy`` and right by ``dx``, ``0 <= dy, dx <
    stride``; by default the stem's stride, ``stem_stride``), in eval mode: ``consistency``,
    the share of (image, moved phase) whose class is the unmoved image's; ``all_phases``, the
    share of images with one class at every phase; and with ``labels [b]``, ``phase_top1_min``
    / ``phase_top1_max``, the top-1 at the worst and best phase. None for a model whose
    output is not logits ``[b, classes]`` (a detector); a ``ValueError`` for a model without a
    stem and no ``stride``."""
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))
    if not isinstance(jax.eval_shape(lambda x: model(x), images[:1]), jax.ShapeDtypeStruct):
        return None
    stride = stride or stem_stride(model, images)
    if stride is None:
        raise ValueError("this model has no stem to take the stride from: pass stride=")
    phases = [(dy, dx) for dy in range(stride) for dx in range(stride)]
    answers = np.stack(
        [np.asarray(jnp.argmax(forward(model, shifted(images, *p)), -1)) for p in phases]
    )
    same = answers == answers[0]
    result = {"consistency": float(same[1:].mean()), "all_phases": float(same.all(0).mean())}
    if labels is not None:
        top1 = (answers == np.asarray(labels)).mean(1)
        result |= {"phase_top1_min": float(top1.min()), "phase_top1_max": float(top1.max())}
    return result


__all__ = ["phase_consistency", "shifted", "stem_shift_change", "stem_stride"]
