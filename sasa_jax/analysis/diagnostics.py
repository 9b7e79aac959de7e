"""Per-layer statistics of a model's attention on a batch: is it learning, or stuck?

``attention_stats(model, images)`` runs one forward pass with every attention layer capturing
(``SelfAttention2D``, ``StemAttention``, ``SlidingStemAttention``: their inputs, outputs and
weights) and returns, per layer:

- ``in_rms`` / ``out_rms``: the root mean square of the layer's input and output;
- ``entropy``: the attention weights' mean entropy over each query's window, as a fraction of
  the uniform weights' (1.0: uniform -- the layer averages its window; 0: one tap);
- ``top``: the mean largest weight of a query;
- ``qk_std`` / ``qr_std``: the spread (std over queries and heads) of the content logit
  ``q·k`` at the query's own position and of the relative logits ``q·r`` over the window's
  offsets: which of the two decides the weights;
- ``rel_rms``: the relative tables' RMS; for the stem, ``mix_entropy``: the spatially-aware
  values' mixture weights ``p(a, b, m)``'s entropy as a fraction of log M (1.0: every position
  class mixes the M value matrices equally).

``gradient_ratios(task, model, batch)`` gives, per top-level part and per attention layer,
``|grad| / |weights|`` of one train-mode step's loss: the relative update SGD would make.
``parameter_movement(initial, params)`` gives ``|W - W_0| / |W_0|`` per parameter: how far
training moved each from where it started (do the stem's embeddings or relative tables learn?).
``stem_rank(model, images)`` gives how many directions the stem's output spans
(``effective_rank``): a stem that passes on little of its tiles starts the stages behind.
``python -m sasa_jax.diagnose --workdir=DIR`` prints all four for a run's checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from sasa_jax.nn import SelfAttention2D, SlidingStemAttention, StemAttention


def attention_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, layer)`` of every SASA layer and stem attention in ``model``."""
    return [
        ("/".join(str(p) for p in path), module)
        for path, module in nnx.iter_graph(model)
        if isinstance(module, SelfAttention2D | StemAttention | SlidingStemAttention)
    ]


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _entropy(p: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each distribution along the last axis; zero shares add 0."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def _entropy_fraction(weights: np.ndarray) -> tuple[float, float]:
    """Mean entropy over queries as a fraction of log(taps in the softmax), and the mean
    largest weight. ``weights`` ``[..., taps]`` (0 for taps outside the softmax)."""
    w = np.asarray(weights, np.float64)
    taps = np.maximum((w > 0).sum(-1), 2)
    entropy = _entropy(w)
    return float(np.mean(entropy / np.log(taps))), float(np.mean(w.max(-1)))


def _node(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def _content_logit(layer, x) -> np.ndarray | None:
    """``q·k`` of each query with its own position, ``[b, H, W, heads]`` (None without keys)."""
    if getattr(layer, "key", None) is None:
        return None
    split = (layer.num_heads, layer.head_dim)
    q = layer.query(x) * layer.head_dim**-0.5
    k = layer.key(x)
    q, k = q.reshape(*q.shape[:3], *split), k.reshape(*k.shape[:3], *split)
    return np.asarray((q * k).sum(-1))


def _mixture_entropy(layer: StemAttention | SlidingStemAttention) -> float | None:
    if layer.value_mixture is None:
        return None
    p = np.asarray(layer.mixture_weights(), np.float64)
    return float(np.mean(_entropy(p)) / math.log(p.shape[-1]))


def attention_stats(model: nnx.Module, images: jax.Array) -> dict[str, dict[str, float]]:
    """The statistics above for each attention layer of ``model`` (in its current train or
    eval mode) on normalised ``images`` ``[b, H, W, 3]``."""
    layers = attention_layers(model)
    for _, layer in layers:
        layer.capture = True
    try:
        _, captured = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(model, images)
    finally:
        for _, layer in layers:
            layer.capture = False
    stats = {}
    for path, layer in layers:
        node = _node(captured, path)
        x = node["inputs"][0]
        entropy, top = _entropy_fraction(node["attention_weights"][0])
        row = {
            "in_rms": _rms(x),
            "out_rms": _rms(node["outputs"][0]),
            "entropy": entropy,
            "top": top,
            "qk_std": None,
            "qr_std": None,
            "rel_rms": None,
        }
        content = _content_logit(layer, x)
        if content is not None:
            row["qk_std"] = float(np.std(content))
        if "relative_logits" in node:
            row["qr_std"] = float(np.std(np.asarray(node["relative_logits"][0])))
        if getattr(layer, "rel_row", None) is not None:
            tables = [layer.rel_row[...].ravel(), layer.rel_col[...].ravel()]
            row["rel_rms"] = _rms(np.concatenate(tables))
        if isinstance(layer, StemAttention | SlidingStemAttention):
            row["mix_entropy"] = _mixture_entropy(layer)
        stats[path] = row
    return stats


@contextlib.contextmanager
def train_mode(model: nnx.Module) -> Iterator[None]:
    """Runs the block in train mode, then puts back the batch statistics a train-mode pass
    moves and leaves ``model`` in eval mode."""
    statistics = nnx.clone(nnx.state(model, nnx.BatchStat))
    model.train()
    try:
        yield
    finally:
        nnx.update(model, statistics)
        model.eval()


def _norm(tree) -> float:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return math.sqrt(sum(float(np.sum(x * x)) for x in leaves)) if leaves else 0.0


def gradient_ratios(task, model: nnx.Module, batch: dict) -> dict[str, float]:
    """``|grad| / |weights|`` of ``task.loss`` on ``batch`` (train mode), per top-level part
    of ``model`` (``stem``, ``stages/0``, ..., ``fpn``, ``class_head``) and per attention
    layer (its path). ``model``'s batch statistics are left as they were, and it is left in
    eval mode."""

    def loss_grads(model, images, batch):
        return nnx.grad(lambda m: task.loss(m, images, batch)[0])(model)

    with train_mode(model):  # compiled: op by op, a model's backward takes tens of seconds
        grads = nnx.jit(loss_grads)(model, task.inputs(batch), batch)
    params = nnx.state(model, nnx.Param)
    flat_g = dict(nnx.to_flat_state(grads))
    flat_w = dict(nnx.to_flat_state(params))
    groups: dict[str, list] = collections.defaultdict(list)
    attention = [path for path, _ in attention_layers(model)]
    for key in flat_w:
        path = "/".join(str(p) for p in key)
        part = "/".join(str(p) for p in key[:2]) if key[0] == "stages" else str(key[0])
        groups[part].append(key)
        for layer in attention:
            if path.startswith(layer + "/"):
                groups[layer].append(key)
    ratios = {}
    for name, keys in groups.items():
        weights = _norm([flat_w[k].get_value() for k in keys])
        ratios[name] = _norm([flat_g[k].get_value() for k in keys]) / max(weights, 1e-30)
    return ratios


def parameter_movement(initial: nnx.State, params: nnx.State, prefix: str = "") -> dict[str, float]:
    """``|W - W_0| / |W_0|`` (``|W|`` where ``W_0`` is zero, as a zero-initialised ``W_Q``) for
    each parameter of ``params`` whose path (``stem/attention/emb_row``) starts with
    ``prefix``; ``initial`` is the same model's parameters at step 0."""
    start = {key: value.get_value() for key, value in nnx.to_flat_state(initial)}
    moved = {}
    for key, value in nnx.to_flat_state(params):
        path = "/".join(str(p) for p in key)
        if path.startswith(prefix):
            origin = np.asarray(start[key], np.float64)
            size = np.linalg.norm(origin)
            distance = np.linalg.norm(np.asarray(value.get_value(), np.float64) - origin)
            moved[path] = float(distance / size if size > 0 else distance)
    return moved


def effective_rank(features) -> tuple[float, int]:
    """``features [..., channels]`` -> (effective rank, components): how many directions the
    channels span over all leading positions. The effective rank is ``exp`` of the entropy of
    the channel covariance's normalised eigenvalues (Roy and Vetterli, 2007): k for k
    uncorrelated directions of equal variance, 1 for one direction, 0 for constant features;
    ``components`` is how many principal components hold 99% of the variance."""
    raw = np.asarray(features, np.float64)
    raw = raw.reshape(-1, raw.shape[-1])
    variance = np.linalg.svd(raw - raw.mean(0), compute_uv=False) ** 2
    total = variance.sum()
    if total <= 1e-12 * np.sum(np.square(raw)):  # constant up to rounding
        return 0.0, 0
    share = variance / total
    return float(np.exp(_entropy(share))), int(np.searchsorted(np.cumsum(share), 0.99) + 1)


def stem_of(model: nnx.Module) -> nnx.Module | None:
    """A classifier's ``stem`` or a detector's ``backbone.stem``; None for neither."""
    stem = getattr(model, "stem", None)
    if stem is None:
        stem = getattr(getattr(model, "backbone", None), "stem", None)
    return stem


def stem_rank(model: nnx.Module, images: jax.Array) -> dict[str, float] | None:
    """How many directions the stem passes on: ``effective_rank`` of the stem's output
    ``[b, h, w, channels]`` on normalised ``images`` ``[b, H, W, 3]``, as the first stage sees
    it in training (train-mode batch norm; the model's batch statistics are left as they were,
    and the model is left in eval mode). ``{"stem_rank", "stem_components", "stem_channels"}``;
    None for a model without a stem (a classifier's ``stem`` or a detector's
    ``backbone.stem``)."""
    stem = stem_of(model)
    if stem is None:
        return None
    with train_mode(model):
        out = nnx.jit(lambda s, x: s(x))(stem, images)
    rank, components = effective_rank(out)
    return {"stem_rank": rank, "stem_components": components, "stem_channels": out.shape[-1]}


def as_rows(stats: dict[str, dict[str, float]], ratios: dict[str, float]) -> list[dict]:
    """One row per attention layer, with its gradient ratio."""
    return [{"layer": path, **row, "grad_ratio": ratios.get(path)} for path, row in stats.items()]


__all__ = [
    "as_rows",
    "attention_layers",
    "attention_stats",
    "effective_rank",
    "gradient_ratios",
    "stem_of",
    "stem_rank",
    "train_mode",
]
