"""The attention stem's attention over a sliding window: not the paper's geometry.

The paper's stem (``StemAttention``) attends within each fixed, non-overlapping block x block
tile, so after its block x block max pool every output sees one tile of pixels and no two
outputs share one. ``SlidingStemAttention`` keeps its parts (relative logits, spatially-aware
values from a mixture of M value matrices, 4 heads) but lets each query attend over the
``window x window`` pixels centred on it, as a SASA layer does, with queries at every
``strides``-th pixel like a strided convolution. ``models.AttentionStem(window=k)`` puts it in
the conv stem's geometry (stride 2, then BN, ReLU and a 3x3 stride-2 max pool), so
neighbouring outputs overlap as the conv stem's do (docs/attention_at_small_scale.md measures
what that is worth).

The spatially-aware values follow eq. 8-9 with the position *relative to the query* in place
of the absolute position inside the pooling tile (a sliding window has no tile):
``v_(query, tap) = (sum_m p(tap, m) W_V^m) x_tap``, ``p(tap, .) = softmax_m((emb_row(a) +
emb_col(b)) . nu_m)`` for the tap at offset (a, b) of the window.

An image has few channels (1-3), so the layer never forms the out_features-wide q, k and v:
``q·k = x_q^T (W_Q W_K^T) x_k`` and ``q·r = x_q^T (W_Q r)`` are computed with the folded
``[in, in]`` and ``[in, window]`` matrices per head, and the output as ``sum_m W_V^m (sum_tap
weight * p(tap, m) * x_tap)``. It is the same function as forming q, k and v.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_jax.nn.attention import mixture_weights

Array = jax.Array


def image_windows(x: Array, window: int, strides: int = 1) -> tuple[Array, np.ndarray]:
    """The ``window x window`` neighbourhood of every ``strides``-th pixel, zero outside the
    image: ``x: [b, H, W, c] -> ([b, h, w, window*window, c], valid [h, w, window*window]
    bool)`` with ``h = ceil(H / strides)``; tap ``i * window + j`` is the pixel at offset
    ``(i - window//2, j - window//2)`` from the query.
    """
    _, height, width, _ = x.shape
    before, after = window // 2, window - 1 - window // 2
    padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    taps = [
        padded[:, i : i + height : strides, j : j + width : strides, :]
        for i in range(window)
        for j in range(window)
    ]
    offsets = np.arange(window)[None, :] - before
    rows = np.arange(0, height, strides)[:, None] + offsets  # [h, window]
    cols = np.arange(0, width, strides)[:, None] + offsets
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    valid = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # [h, w, window, window]
    return jnp.stack(taps, axis=3), valid.reshape(len(rows), len(cols), window * window)


class SlidingStemAttention(nnx.Module):
    """Stem attention over each pixel's ``window x window`` neighbourhood (borders masked),
    with relative logits and spatially-aware values: ``[b, H, W, in] -> [b, H/s, W/s, out]``
    for ``strides`` s (queries at every s-th pixel, as a strided convolution).

    Parameters, as ``StemAttention``'s with ``block`` replaced by ``window``: bias-free
    ``W_Q``, ``W_K`` (``[in, out]``), relative tables ``[window, head_dim/2]`` per axis, M
    value matrices ``[M, in, out]``, position embeddings ``[window, embed_dim]`` per axis and
    M mixture embeddings. ``zero_query`` starts ``W_Q`` at zero: every pixel first averages
    its window uniformly, the layer starts as M fixed filters and learns where to look.
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        window: int = 7,
        strides: int = 1,
        num_heads: int = 4,
        num_mixtures: int = 4,
        zero_query: bool = True,
        embed_dim: int | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides!r}")
        if window < 1 or num_mixtures < 1:
            raise ValueError(f"window and num_mixtures must be >= 1, got {window}, {num_mixtures}")
        if out_features % num_heads or (out_features // num_heads) % 2:
            raise ValueError(
                f"out_features ({out_features}) must split into num_heads ({num_heads}) heads "
                "of even size"
            )
        self.in_features, self.out_features = in_features, out_features
        self.window, self.strides, self.num_heads = window, strides, num_heads
        self.head_dim = out_features // num_heads
        self.dtype = dtype
        self.capture = False  # set True to sow the weights, inputs and outputs
        lecun = jax.nn.initializers.lecun_normal()
        normal = jax.nn.initializers.normal(1.0)
        query = lecun(rngs.params(), (in_features, out_features), param_dtype)
        self.w_query = nnx.Param(jnp.zeros_like(query) if zero_query else query)
        self.w_key = nnx.Param(lecun(rngs.params(), (in_features, out_features), param_dtype))
        table = (window, self.head_dim // 2)
        self.rel_row = nnx.Param(normal(rngs.params(), table, param_dtype))
        self.rel_col = nnx.Param(normal(rngs.params(), table, param_dtype))
        mixture_init = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.value_mixture = nnx.Param(
            mixture_init(rngs.params(), (num_mixtures, in_features, out_features), param_dtype)
        )
        embed_dim = embed_dim or out_features
        self.emb_row = nnx.Param(normal(rngs.params(), (window, embed_dim), param_dtype))
        self.emb_col = nnx.Param(normal(rngs.params(), (window, embed_dim), param_dtype))
        self.mixture_emb = nnx.Param(normal(rngs.params(), (num_mixtures, embed_dim), param_dtype))

    def mixture_weights(self) -> Array:
        """p(tap, m): ``[window, window, num_mixtures]`` (float32)."""
        return mixture_weights(self.emb_row[...], self.emb_col[...], self.mixture_emb[...])

    def _heads(self, w: nnx.Param, dtype) -> Array:
        return w[...].astype(dtype).reshape(self.in_features, self.num_heads, self.head_dim)

    def logits(self, x: Array, taps: Array) -> Array:
        """``q·k + q·r`` per pixel, head and tap: ``[b, H, W, heads, window*window]``."""
        dtype = x.dtype
        wq, wk = self._heads(self.w_query, dtype), self._heads(self.w_key, dtype)
        wq = wq * jnp.asarray(self.head_dim**-0.5, dtype)
        half = self.head_dim // 2
        folded_k = jnp.einsum("chd,ehd->hce", wq, wk)  # [heads, in, in]
        folded_row = jnp.einsum("chd,ad->hac", wq[..., :half], self.rel_row[...].astype(dtype))
        folded_col = jnp.einsum("chd,ad->hac", wq[..., half:], self.rel_col[...].astype(dtype))
        # Products and sums over the 1-3 channels, not dots: XLA's CPU dot is slow on many tiny
        # matmuls, and XLA:GPU fails to tile such a dot of the strided query pixels
        # (accelerator_tests/test_sliding_stem_compiles.py).
        query_side = (x[..., None, :, None] * folded_k).sum(-2)  # [b, H, W, heads, in]
        qk = (query_side[..., :, None, :] * taps[..., None, :, :]).sum(-1)
        rows = (x[..., None, None, :] * folded_row).sum(-1)  # [b, H, W, heads, window]
        cols = (x[..., None, None, :] * folded_col).sum(-1)
        qr = (rows[..., :, None] + cols[..., None, :]).reshape(qk.shape)
        return qk + qr

    def __call__(self, x: Array) -> Array:
        """``x: [b, H, W, in_features] -> [b, H/strides, W/strides, out_features]`` (sizes
        rounded up): the queries are every ``strides``-th pixel, as in a strided conv."""
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected [batch, height, width, {self.in_features}], got {tuple(x.shape)}"
            )
        dtype = self.dtype or jnp.result_type(x.dtype, self.w_key[...].dtype)
        images = x.astype(dtype)
        taps, valid = image_windows(images, self.window, self.strides)
        x = images[:, :: self.strides, :: self.strides]  # the queries' pixels
        logits = self.logits(x, taps).astype(jnp.float32)
        logits = jnp.where(valid[None, :, :, None, :], logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)  # [b, H, W, heads, taps]
        mixture = self.mixture_weights()
        mixture = mixture.reshape(-1, mixture.shape[-1]).astype(dtype)  # [taps, M]
        weighted = weights.astype(dtype)[..., None] * taps[..., None, :, :]  # [b,H,W,heads,taps,in]
        pooled = jnp.einsum("bxyhtc,tm->bxyhmc", weighted, mixture)  # one matmul over the taps
        kernels = self.value_mixture[...].astype(dtype)
        kernels = kernels.reshape(*kernels.shape[:2], self.num_heads, self.head_dim)
        out = jnp.einsum("bxyhmc,mchd->bxyhd", pooled, kernels).reshape(*x.shape[:3], -1)
        if self.capture:
            self.sow(nnx.Intermediate, "attention_weights", weights)
            self.sow(nnx.Intermediate, "inputs", images)
            self.sow(nnx.Intermediate, "outputs", out)
        return out


__all__ = ["SlidingStemAttention", "image_windows"]
