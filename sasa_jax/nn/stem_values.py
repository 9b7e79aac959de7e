"""The attention stems' shared parts: the spatially-aware values' parameters and mixture
weights (eq. 8-9) and the heads check, for ``StemAttention`` (the paper's stem) and
``SlidingStemAttention`` (the conv stem's geometry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def mixture_weights(emb_row: Array, emb_col: Array, mixture_emb: Array) -> Array:
    """Eq. 9, ``p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . nu_m)``: ``[rows, cols, M]``
    (float32) from ``emb_row [rows, e]``, ``emb_col [cols, e]`` and ``mixture_emb [M, e]``."""
    emb = emb_row.astype(jnp.float32)[:, None, :] + emb_col.astype(jnp.float32)[None, :, :]
    return jax.nn.softmax(jnp.einsum("abe,me->abm", emb, mixture_emb.astype(jnp.float32)), -1)


def spatial_value_params(
    size: int,
    in_features: int,
    out_features: int,
    num_mixtures: int,
    embed_dim: int,
    param_dtype,
    rngs,
) -> tuple[nnx.Param, nnx.Param, nnx.Param, nnx.Param]:
    """The spatially-aware values' parameters (eq. 8-9) of a stem over ``size x size``
    positions: M value matrices ``[M, in, out]`` (LeCun normal each), position embeddings
    ``[size, embed_dim]`` per axis and M mixture embeddings ``[M, embed_dim]``.

    The mixture embeddings are N(0, 1) and the position embeddings N(0, 1 / (2 embed_dim)), so
    that eq. 9's logits ``(emb_row[a] + emb_col[b]) . nu_m`` start with unit variance and the
    softmax over the M mixtures starts soft. With all three at N(0, 1) the logits' standard
    deviation is ``sqrt(2 embed_dim)`` (about 6 at 16): each position starts on one mixture
    (mixture entropy 0.2 of log M), and in 10 epochs on the cluttered digits the position
    embeddings moved 5-8% of their norm, against 90-100% from the smaller start
    (docs/attention_at_small_scale.md).
    """
    lecun = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    normal = jax.nn.initializers.normal(1.0)
    position = jax.nn.initializers.normal((2 * embed_dim) ** -0.5)
    shape = (num_mixtures, in_features, out_features)
    return (
        nnx.Param(lecun(rngs.params(), shape, param_dtype)),
        nnx.Param(position(rngs.params(), (size, embed_dim), param_dtype)),
        nnx.Param(position(rngs.params(), (size, embed_dim), param_dtype)),
        nnx.Param(normal(rngs.params(), (num_mixtures, embed_dim), param_dtype)),
    )


def check_stem_heads(out_features: int, num_heads: int) -> None:
    """Raise ValueError unless a stem's ``out_features`` split into ``num_heads`` heads of even
    size (each head's relative logits take half its features per axis)."""
    if out_features % num_heads or (out_features // num_heads) % 2:
        raise ValueError(
            f"out_features ({out_features}) must split into num_heads ({num_heads}) heads "
            "of even size"
        )
