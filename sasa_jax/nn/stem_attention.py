"""The attention stem's attention (eq. 4-9) as a Flax NNX layer: attention in each block x
block tile with spatially-aware (or stand-alone, or convolutional) values. Its
initialisation follows ``nn.attention``'s; on TPU its projections run in the kernel's tile
layout (``attention.stem_tpu``). ``attend_norm_pool`` is the paper's stem around it (batch
norm, ReLU, max pool), on TPU on the kernel's output tiles."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.attention import block_attention, from_blocks, native_stem, stem_attention, stem_tpu
from sasa_jax.nn.attention import (
    STEM_VALUES,
    _check_implementation,
    _choice,
    _project,
    _projection,
    _split_heads,
)
from sasa_jax.nn.norm import batch_statistics, normalise, uses_running_average
from sasa_jax.nn.pool import block_max
from sasa_jax.nn.stem_values import check_stem_heads, mixture_weights, spatial_value_params

Array = jax.Array


class StemAttention(nnx.Module):
    """The attention stem's attention (eq. 4-9): attention in each block x block tile.

    Maps ``[batch, H, W, in_features]`` to ``[batch, H, W, out_features]``; queries attend to
    every pixel of their own non-overlapping ``block x block`` tile with relative logits
    (offsets in ``[-(block-1), block-1]``): ``block_attention``. ``models.AttentionStem``
    follows it with batch norm, ReLU and a ``block x block`` max pool (224x224x3 ->
    56x56x64).

    values:
      "spatially_aware" (default, eq. 8-9): ``v_ab = (sum_m p(a,b,m) W_V^m) x_ab`` with
        ``p(a,b,m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m)``, (a, b) the absolute position
        inside the tile; p is shared across heads.
      "stand_alone": plain eq. 3 values ``W_V x``.
      "spatial_conv_values": values from a block x block "SAME" convolution (no bias).

    A query's output lies in the span of its block's values: ``num_mixtures * in_features``
    directions for spatially-aware values (4 for grayscale input with M = 4), ``in_features``
    for stand-alone ones. ``zero_query`` starts ``W_Q`` at zero, so every query first averages
    its block's values uniformly (a patch embedding) and learns where to look.

    On TPU, with ``implementation="auto"`` and spatially-aware or stand-alone values, the
    projections run in the kernel's tile layout (``attention.stem_tpu``): the same numbers
    without full-resolution q, k and v maps. On CPU, with "auto" or "native", they run inside
    the C++ stem kernel (``attention.native_stem``) for the same reason. Everywhere else, and
    for the weights, they run on the map before ``block_attention``.
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        block: int = 4,
        num_heads: int = 4,
        num_mixtures: int = 4,
        values: str = "spatially_aware",
        zero_query: bool = False,
        embed_dim: int | None = None,
        implementation: str = "auto",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _choice(values, "values", STEM_VALUES)
        _check_implementation(implementation)
        if block < 1 or num_mixtures < 1:
            raise ValueError(f"block and num_mixtures must be >= 1, got {block}, {num_mixtures}")
        check_stem_heads(out_features, num_heads)
        self.in_features, self.out_features = in_features, out_features
        self.block, self.num_heads = block, num_heads
        self.head_dim = out_features // num_heads
        self.values, self.implementation, self.dtype = values, implementation, dtype
        # set True to sow the attention weights (on the map), inputs and outputs
        self.capture = False
        self.query = _projection(in_features, out_features, dtype, param_dtype, rngs)
        if zero_query:  # uniform weights in every block at first (see the class docstring)
            self.query.kernel.set_value(jnp.zeros_like(self.query.kernel[...]))
        self.key = _projection(in_features, out_features, dtype, param_dtype, rngs)
        normal = jax.nn.initializers.normal(1.0)
        table = (2 * block - 1, self.head_dim // 2)
        self.rel_row = nnx.Param(normal(rngs.params(), table, param_dtype))
        self.rel_col = nnx.Param(normal(rngs.params(), table, param_dtype))
        self.value = (
            _projection(in_features, out_features, dtype, param_dtype, rngs)
            if values == "stand_alone"
            else None
        )
        self.value_conv = (
            nnx.Conv(
                in_features,
                out_features,
                (block, block),
                padding="SAME",
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if values == "spatial_conv_values"
            else None
        )
        if values == "spatially_aware":
            self.value_mixture, self.emb_row, self.emb_col, self.mixture_emb = spatial_value_params(
                block,
                in_features,
                out_features,
                num_mixtures,
                embed_dim or out_features,
                param_dtype,
                rngs,
            )
        else:
            self.value_mixture = self.emb_row = self.emb_col = self.mixture_emb = None

    def mixture_weights(self) -> Array:
        """p(a, b, m) of eq. 9, ``[block, block, num_mixtures]`` (float32)."""
        return mixture_weights(self.emb_row[...], self.emb_col[...], self.mixture_emb[...])

    def mixed_values(self) -> Array:
        """Eq. 8's value matrix at each position of the block, ``sum_m p(a,b,m) W_V^m``:
        ``[block, block, in_features, out_features]`` (float32; spatially-aware values)."""
        kernels = self.value_mixture[...].astype(jnp.float32)
        return jnp.einsum("abm,mco->abco", self.mixture_weights(), kernels)

    def _values(self, x: Array) -> Array:
        if self.value is not None:
            return _project(self.value, x)
        if self.value_conv is not None:
            return self.value_conv(x)
        # Mix the M value matrices per position class, then apply the 16 mixed matrices.
        dtype = self.dtype or jnp.result_type(x.dtype, self.value_mixture[...].dtype)
        mixed = self.mixed_values()
        b, h, w, c = x.shape
        tiles = x.reshape(b, h // self.block, self.block, w // self.block, self.block, c)
        v = jnp.einsum("bhawgc,agco->bhawgo", tiles.astype(dtype), mixed.astype(dtype))
        return v.reshape(b, h, w, self.out_features)

    def __call__(self, x: Array, *, return_weights: bool = False):
        """``x: [b, H, W, in_features] -> [b, H, W, out_features]`` (and the weights
        ``[b*(H/s)*(W/s), s, s, heads, s*s]`` per tile). With ``capture`` set, it also sows
        the weights on the map, ``[b, H, W, heads, s*s]``, as ``attention_weights``."""
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected [batch, height, width, {self.in_features}], got {tuple(x.shape)}"
            )
        if x.shape[1] % self.block or x.shape[2] % self.block:
            raise ValueError(
                f"the attention stem needs height and width divisible by block={self.block}, "
                f"got {tuple(x.shape[1:3])}"
            )
        want_weights = return_weights or self.capture
        branches = self._kernel_branches(x.shape)
        if want_weights or not branches:
            out, weights = self._attend(x, want_weights)
        else:  # the kernels take the projections (attention.stem_tpu, attention.native_stem)
            out = jax.lax.platform_dependent(
                x, **branches, default=lambda x: self._attend(x, False)[0]
            )
            weights = None
        if self.capture:
            self.sow(nnx.Intermediate, "attention_weights", from_blocks(weights, x.shape[:3]))
            self.sow(nnx.Intermediate, "inputs", x)
            self.sow(nnx.Intermediate, "outputs", out)
        return (out, weights) if return_weights else out

    def _kernel_branches(self, shape: tuple[int, ...]) -> dict:
        """The platforms whose stem kernels take the projections for this input, with each
        one's function of ``x``."""
        branches = {}
        if self.takes_tiles(shape):
            branches["tpu"] = self.attend_in_tiles
        if self.takes_native(shape):
            branches["cpu"] = self.attend_native
        return branches

    def takes_native(self, shape: tuple[int, ...]) -> bool:
        """Whether on CPU the C++ stem kernel takes the projections (``attend_native``):
        ``implementation`` "auto" or "native" where that kernel is offered, spatially-aware or
        stand-alone values, blocks and heads of at most ``native_stem.MAX_BLOCK`` and
        ``native_stem.MAX_HEAD``, no weights captured."""
        if self.implementation not in ("auto", "native") or self.values == "spatial_conv_values":
            return False
        fits = self.block <= native_stem.MAX_BLOCK and self.head_dim <= native_stem.MAX_HEAD
        return not self.capture and fits and native_stem.available()

    def takes_tiles(self, shape: tuple[int, ...]) -> bool:
        """Whether on TPU an input of this shape takes the tile layout's projections
        (``attend_in_tiles``): ``implementation="auto"``, spatially-aware or stand-alone
        values, no weights captured, and tiles that hold whole blocks (``stem_tpu.fits``)."""
        if self.implementation != "auto" or self.values == "spatial_conv_values":
            return False
        return not self.capture and stem_tpu.fits(shape[1], shape[2], self.block)

    def _attend(self, x: Array, want_weights: bool) -> tuple[Array, Array | None]:
        """Projections on the map, then ``block_attention``: ``[b, H, W, out_features]`` (and
        the weights when ``want_weights``)."""
        q = _project(self.query, x)
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        k, v = _project(self.key, x), self._values(x)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        result = block_attention(
            q,
            k,
            v,
            block=self.block,
            rel_row=self.rel_row[...].astype(q.dtype),
            rel_col=self.rel_col[...].astype(q.dtype),
            implementation=self.implementation,
            return_weights=want_weights,
        )
        out, weights = result if want_weights else (result, None)
        return out.reshape(*x.shape[:3], self.out_features), weights

    def _kernel_inputs(self, x: Array) -> tuple[Array, ...]:
        """What the stem kernels take: ``x`` in the compute dtype, ``W_Q``, ``W_K``, each
        block position's value matrix ``[block*block*in_features, out_features]``
        (spatially-aware or stand-alone values) and the two tables."""
        kernel = self.query.kernel[...]
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        if self.value is not None:  # one value matrix for every position of the block
            values = jnp.tile(self.value.kernel[...], (self.block * self.block, 1))
        else:
            values = self.mixed_values().reshape(-1, self.out_features)
        key = self.key.kernel[...]
        return x.astype(dtype), kernel, key, values, self.rel_row[...], self.rel_col[...]

    def attend_native(self, x: Array) -> Array:
        """``_attend``'s numbers from the C++ stem kernel (``attention.native_stem``; CPU):
        ``[b, H, W, out_features]``."""
        return native_stem.stem_attention(
            *self._kernel_inputs(x), heads=self.num_heads, block=self.block
        )

    def attend_in_tiles(self, x: Array, tiled: bool = False) -> Array:
        """``_attend``'s numbers with the projections in the TPU kernel's tile layout
        (``attention.stem_tpu``; lowered for TPU, and for CPU in interpret mode):
        spatially-aware and stand-alone values. ``[b, H, W, out_features]``, or with
        ``tiled`` the kernel's output tiles ``[b, T, heads, c, TQ]``."""
        return stem_attention(
            *self._kernel_inputs(x), heads=self.num_heads, block=self.block, tiled=tiled
        )


def attend_norm_pool(attention: StemAttention, norm: nnx.BatchNorm, x: Array) -> Array:
    """``block_max(relu(norm(attention(x))), block)``: ``[b, H, W, cin] -> [b, H/block,
    W/block, out_features]``, the paper's stem. On TPU, where ``attention.takes_tiles``, the
    batch norm's statistics, the ReLU and the max pool are taken on the kernel's output tiles
    (``stem_tpu.tile_moments``, ``stem_tpu.tile_block_max``): only the pooled map is laid
    out. Everywhere else, and on TPU otherwise, on the map. ``norm``'s running averages are
    updated in train mode either way."""
    if not attention.takes_tiles(x.shape):
        return _on_map(attention, norm, x)
    graph, state = nnx.split((attention, norm))
    train = not uses_running_average(norm)

    def branch(run):
        def pure(state, x):
            attention, norm = nnx.merge(graph, state)
            y = run(attention, norm, x)
            return (y, nnx.state(norm, nnx.BatchStat)) if train else (y, None)

        return pure

    y, stats = jax.lax.platform_dependent(state, x, tpu=branch(_in_tiles), default=branch(_on_map))
    if train:  # in eval mode nothing moves (and nothing is written: eval_shape may trace it)
        nnx.update(norm, stats)
    return y


def _on_map(attention: StemAttention, norm: nnx.BatchNorm, x: Array) -> Array:
    return block_max(nnx.relu(norm(attention(x))), attention.block)


def _in_tiles(attention: StemAttention, norm: nnx.BatchNorm, x: Array) -> Array:
    y_t = attention.attend_in_tiles(x, tiled=True)  # [b, T, n, c, TQ]
    (height, width), block = x.shape[1:3], attention.block
    if uses_running_average(norm):
        mean, var = norm.mean[...], norm.var[...]
    else:
        mean, var = batch_statistics(norm, stem_tpu.tile_moments(y_t, height, width, block))
    y = nnx.relu(normalise(norm, y_t, mean, var, (*y_t.shape[2:4], 1)))
    return stem_tpu.tile_block_max(y, height, width, block)
