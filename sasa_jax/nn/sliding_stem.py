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
``[in, in]`` and ``[in, window]`` matrices per head, and the output per head as one matmul of
the weighted taps with the taps' value matrices ``sum_m p(tap, m) W_V^m``. It is the same
function as forming q, k and v.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_jax.nn.stem_values import check_stem_heads, mixture_weights, spatial_value_params

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
        check_stem_heads(out_features, num_heads)
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
        self.value_mixture, self.emb_row, self.emb_col, self.mixture_emb = spatial_value_params(
            window,
            in_features,
            out_features,
            num_mixtures,
            embed_dim or out_features,
            param_dtype,
            rngs,
        )

    def mixture_weights(self) -> Array:
        """p(tap, m): ``[window, window, num_mixtures]`` (float32)."""
        return mixture_weights(self.emb_row[...], self.emb_col[...], self.mixture_emb[...])

    def _tap_mixtures(self) -> Array:
        """p(tap, m) with the taps in ``image_windows``' order: ``[window*window, M]``."""
        return self.mixture_weights().reshape(-1, self.value_mixture.shape[0])

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
        # A product and sum per channel (1-3 of them), not dots: XLA's CPU dot is slow on many
        # tiny matmuls, and XLA:GPU fails to tile such a dot of the strided query pixels
        # (accelerator_tests/test_sliding_stem_compiles.py). One channel at a time never forms
        # a [b, H, W, heads, taps, in] tensor, which halves the CPU time forward and backward.
        channels = range(x.shape[-1])
        query_side = sum(x[..., c, None, None] * folded_k[:, c] for c in channels)  # [b,H,W,h,in]
        qk = sum(query_side[..., e, None] * taps[..., None, :, e] for e in channels)
        rows = sum(x[..., c, None, None] * folded_row[..., c] for c in channels)  # [b,H,W,h,win]
        cols = sum(x[..., c, None, None] * folded_col[..., c] for c in channels)
        qr = (rows[..., :, None] + cols[..., None, :]).reshape(qk.shape)
        return qk + qr

    def tap_values(self, dtype) -> Array:
        """The value matrix of each tap, ``sum_m p(tap, m) W_V^m``, per head:
        ``[heads, window*window*in, head_dim]``."""
        kernels = self.value_mixture[...].reshape(
            -1, self.in_features, self.num_heads, self.head_dim
        )
        per_tap = jnp.einsum("tm,mchd->htcd", self._tap_mixtures(), kernels.astype(jnp.float32))
        return per_tap.reshape(self.num_heads, -1, self.head_dim).astype(dtype)

    def weighted_values(self, weights: Array, taps: Array) -> Array:
        """``sum_tap weight * (sum_m p(tap, m) W_V^m) x_tap`` per head: weights ``[b, H, W,
        heads, taps]`` and taps ``[b, H, W, taps, in]`` -> ``[b, H, W, heads, head_dim]``.

        On CPU as one ``[pixels, taps*in] @ [taps*in, head_dim]`` matmul per head, which XLA's
        CPU backend runs 2.6x faster (forward and backward) than the accelerators' form: there
        the taps are mixed into the M mixture components first and the value matrices applied
        after, which needs a third less memory traffic on TPU v5e (``python -m sasa_jax.aot``).
        """
        return jax.lax.platform_dependent(
            weights, taps, cpu=self._values_per_head, default=self._values_per_mixture
        )

    def _values_per_head(self, weights: Array, taps: Array) -> Array:
        values = self.tap_values(taps.dtype)
        flat = taps.reshape(-1, *taps.shape[-2:])  # [pixels, taps, in]
        pixels = flat.shape[0]
        per_head = weights.reshape(pixels, self.num_heads, -1, 1)  # [pixels, heads, taps, 1]
        heads = [
            (per_head[:, h] * flat).reshape(pixels, -1) @ values[h] for h in range(len(values))
        ]
        return jnp.stack(heads, axis=1).reshape(*weights.shape[:-1], self.head_dim)

    def _values_per_mixture(self, weights: Array, taps: Array) -> Array:
        mixture = self._tap_mixtures().astype(taps.dtype)
        weighted = weights[..., None] * taps[..., None, :, :]  # [b, H, W, heads, taps, in]
        pooled = jnp.einsum("bxyhtc,tm->bxyhmc", weighted, mixture)
        kernels = self.value_mixture[...].astype(taps.dtype)
        kernels = kernels.reshape(*kernels.shape[:2], self.num_heads, self.head_dim)
        return jnp.einsum("bxyhmc,mchd->bxyhd", pooled, kernels)

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
        out = self.weighted_values(weights.astype(dtype), taps)
        out = out.reshape(*x.shape[:3], self.out_features)
        if self.capture:
            self.sow(nnx.Intermediate, "attention_weights", weights)
            self.sow(nnx.Intermediate, "inputs", images)
            self.sow(nnx.Intermediate, "outputs", out)
        return out


__all__ = ["SlidingStemAttention", "image_windows"]
