"""Pictures of what a classifier's attention looks at (``python -m sasa_jax.visualize``):

* for two query pixels (marked +) in the stem and in every attention layer, each head's
  attention weights over its window, overlaid on the input image (a layer's feature-map cells
  are drawn as the image patches they cover);
* for each attention layer, each head's relative-position logits ``q·r`` at the centre query,
  as a heat map over the window offsets.

``attention_maps(model, image)`` captures them from one forward pass; ``draw`` makes the
figure (matplotlib's ``Figure``, no pyplot: the caller's backend is left alone).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from sasa_jax.attention import axis_window
from sasa_jax.nn import SelfAttention2D, StemAttention


@dataclasses.dataclass
class LayerMaps:
    """What one attention layer did to one image."""

    name: str
    weights: np.ndarray  # [h, w, heads, kh*kw]
    window: tuple[int, int]
    border: str
    dilation: int
    relative: np.ndarray | None  # [h, w, heads, Lr, Lc]
    stem_block: int = 0  # > 0 for the stem: windows are its non-overlapping tiles


def _attention_layers(model) -> list[tuple[str, nnx.Module]]:
    """``(path, layer)`` of every attention layer, in forward order (the stem first)."""
    found = [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, SelfAttention2D | StemAttention)
    ]
    found.sort(key=lambda item: (not isinstance(item[1], StemAttention), item[0]))
    return [("/".join(str(p) for p in path) or "model", module) for path, module in found]


def attention_maps(model, image: np.ndarray) -> list[LayerMaps]:
    """Runs ``image`` (``[H, W, 3]`` normalised float) through ``model`` and collects each
    attention layer's weights and relative logits. Raises ValueError if there are none."""
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            "this run's model has no attention layers (a conv baseline?); there is nothing to draw"
        )
    for _, layer in layers:
        layer.capture = True
    try:
        # float32: a float64 array (numpy's default) would only be truncated, with a warning.
        # One compiled forward pass, not one small program per operation.
        _, captured = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(
            model, np.asarray(image, np.float32)[None]
        )
    finally:
        for _, layer in layers:
            layer.capture = False
    maps = []
    for name, layer in layers:
        node = captured
        for key in name.split("/"):
            node = node[int(key) if key.isdigit() else key]
        relative = node["relative_logits"][0][0] if "relative_logits" in node else None
        if isinstance(layer, StemAttention):
            maps.append(
                LayerMaps(
                    name,
                    np.asarray(node["attention_weights"][0][0]),
                    (layer.block, layer.block),
                    "clamp",
                    1,
                    None,
                    stem_block=layer.block,
                )
            )
        else:
            maps.append(
                LayerMaps(
                    name,
                    np.asarray(node["attention_weights"][0][0]),
                    layer.window,
                    layer.border,
                    layer.dilation,
                    None if relative is None else np.asarray(relative),
                )
            )
    return maps


def _window_positions(maps: LayerMaps, i: int, j: int):
    """Feature-map positions and validity of each window tap of query (i, j)."""
    h, w = maps.weights.shape[:2]
    kh, kw = maps.window
    if maps.stem_block:
        s = maps.stem_block
        rows = (i // s) * s + np.arange(s)
        cols = (j // s) * s + np.arange(s)
        return rows, np.ones(s, bool), cols, np.ones(s, bool)
    r = axis_window(h, kh, maps.dilation, maps.border)
    c = axis_window(w, kw, maps.dilation, maps.border)
    return r.position[i], r.valid[i], c.position[j], c.valid[j]


def window_heatmap(maps: LayerMaps, i: int, j: int, head: int) -> np.ndarray:
    """Head ``head``'s weights of query (i, j) placed on the layer's ``[h, w]`` grid."""
    h, w = maps.weights.shape[:2]
    kh, kw = maps.window
    rows, row_ok, cols, col_ok = _window_positions(maps, i, j)
    grid = np.zeros((h, w), np.float32)
    weights = maps.weights[i, j, head].reshape(kh, kw)
    for t in range(kh):
        for u in range(kw):
            if row_ok[t] and col_ok[u]:
                grid[rows[t], cols[u]] += weights[t, u]
    return grid


def _queries(h: int, w: int) -> list[tuple[int, int]]:
    return [(h // 2, w // 2), (h // 4, (3 * w) // 4)]


def draw(image: np.ndarray, maps: list[LayerMaps], title: str = ""):
    """The figure: attention overlays, then relative-logit maps. ``image`` is ``[H, W, 3]``
    in [0, 1]."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    heads = max(m.weights.shape[2] for m in maps)
    rel_layers = [m for m in maps if m.relative is not None]
    rows = 2 * len(maps) + len(rel_layers)
    fig = Figure(figsize=(1.4 * (heads + 1), 1.5 * rows))
    axes = fig.subplots(rows, heads + 1, squeeze=False)
    size = image.shape[0]
    row = 0
    for m in maps:
        h, w = m.weights.shape[:2]
        for i, j in _queries(h, w):
            scale = size / h
            ax = axes[row, 0]
            ax.imshow(image)
            ax.plot((j + 0.5) * scale - 0.5, (i + 0.5) * scale - 0.5, "r+", ms=8, mew=2)
            ax.set_ylabel(f"{m.name}\n{h}x{w} q=({i},{j})", fontsize=6)
            for head in range(heads):
                ax = axes[row, head + 1]
                if head < m.weights.shape[2]:
                    grid = window_heatmap(m, i, j, head)
                    up = np.kron(grid, np.ones((int(np.ceil(scale)),) * 2))[:size, :size]
                    ax.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1)
                    ax.imshow(up, cmap="magma", alpha=0.7, vmin=0, vmax=max(grid.max(), 1e-6))
                    if row == 0:
                        ax.set_title(f"head {head}", fontsize=7)
            row += 1
    for m in rel_layers:
        h, w = m.weights.shape[:2]
        ci, cj = h // 2, w // 2
        axes[row, 0].text(
            0.5,
            0.5,
            f"{m.name}\nrelative logits q·r\nat ({ci},{cj})",
            ha="center",
            va="center",
            fontsize=6,
        )
        for head in range(m.relative.shape[2]):
            ax = axes[row, head + 1]
            ax.imshow(m.relative[ci, cj, head], cmap="coolwarm")
            lr, lc = m.relative.shape[3:]
            ax.set_xticks([0, lc // 2, lc - 1], [-(lc // 2), 0, lc // 2], fontsize=5)
            ax.set_yticks([0, lr // 2, lr - 1], [-(lr // 2), 0, lr // 2], fontsize=5)
        row += 1
    for ax in axes.flat:
        if not ax.images:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.texts:
                ax.axis("off")
    for ax in axes[: 2 * len(maps)].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / rows))
    return fig


__all__ = ["LayerMaps", "attention_maps", "draw", "window_heatmap"]
