"""The NNX layers: the SASA layer and the attention stem."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_attention, reference_block_attention
from flax import nnx

from sasa_jax.models import AttentionStem
from sasa_jax.nn import SlidingStemAttention, block_max
from sasa_jax.nn.attention import SelfAttention2D, sinusoidal_2d
from sasa_jax.nn.stem_attention import StemAttention


def _params(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    "shape, strides, window, expected",
    [
        ((2, 8, 8, 16), 1, 7, (2, 8, 8, 32)),
        ((2, 8, 8, 16), 2, 7, (2, 4, 4, 32)),
        ((1, 7, 9, 16), 2, 3, (1, 4, 5, 32)),  # odd sizes: SAME pooling, like a stride-2 conv
        ((1, 6, 5, 16), 1, (3, 5), (1, 6, 5, 32)),
    ],
)
def test_layer_shapes(shape, strides, window, expected):
    layer = nnx.eval_shape(
        lambda: SelfAttention2D(16, 32, strides=strides, window=window, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(layer)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    chex.assert_shape(jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x), expected)


@pytest.mark.parametrize(
    "positional, logits, expected",
    [
        # 3 dense projections + rel tables (k rows of head_dim/2 each, for rows and columns)
        ("relative", "qk+qr", 3 * 64 * 128 + 2 * 7 * (128 // 8 // 2)),
        ("relative", "qr", 2 * 64 * 128 + 2 * 7 * (128 // 8 // 2)),
        ("absolute", "qk+qr", 3 * 64 * 128),
        ("none", "qk+qr", 3 * 64 * 128),
    ],
)
def test_layer_parameter_count(positional, logits, expected):
    layer = nnx.eval_shape(
        lambda: SelfAttention2D(64, 128, positional=positional, logits=logits, rngs=nnx.Rngs(0))
    )
    assert _params(layer) == expected


def test_clamp_layer_has_longer_tables():
    layer = SelfAttention2D(16, 16, window=5, num_heads=2, border="clamp", rngs=nnx.Rngs(0))
    chex.assert_shape([layer.rel_row[...], layer.rel_col[...]], [(9, 4), (9, 4)])


def test_layer_is_projections_plus_op():
    """The layer's wiring (scaling, head split) against the dense reference op."""
    layer = SelfAttention2D(8, 16, window=3, num_heads=2, rngs=nnx.Rngs(1))
    x = _x((2, 5, 6, 8))
    wq, wk, wv = (m.kernel[...] for m in (layer.query, layer.key, layer.value))
    split = lambda t: t.reshape(2, 5, 6, 2, 8)  # noqa: E731
    ref, _ = reference_attention(
        split(x @ wq) / np.sqrt(8.0),
        split(x @ wk),
        split(x @ wv),
        window=3,
        rel_row=layer.rel_row[...],
        rel_col=layer.rel_col[...],
    )
    chex.assert_trees_all_close(layer(x), ref.reshape(2, 5, 6, 16), atol=1e-4, rtol=1e-4)


def test_stride_two_is_average_pool_after_attention():
    x = _x((2, 8, 6, 8))
    dense = SelfAttention2D(8, 16, window=3, num_heads=2, rngs=nnx.Rngs(3))
    pooled = SelfAttention2D(8, 16, window=3, num_heads=2, strides=2, rngs=nnx.Rngs(3))
    y = np.asarray(dense(x)).reshape(2, 4, 2, 3, 2, 16).mean(axis=(2, 4))
    chex.assert_trees_all_close(pooled(x), y, atol=1e-5, rtol=1e-5)


def _shift(x, dy, dx):
    return jnp.roll(x, (dy, dx), axis=(1, 2))


@pytest.mark.parametrize(
    "positional, equivariant", [("relative", True), ("none", True), ("absolute", False)]
)
def test_translation_equivariance_away_from_borders(positional, equivariant):
    layer = SelfAttention2D(8, 16, window=3, num_heads=2, positional=positional, rngs=nnx.Rngs(0))
    x = _x((1, 12, 12, 8))
    y, y_shifted = layer(x), layer(_shift(x, 2, 3))
    # Interior queries whose windows (radius 1) stay away from both the border and the wrap.
    inner = np.s_[:, 4:10, 5:10]
    close = np.allclose(_shift(y, 2, 3)[inner], y_shifted[inner], atol=1e-5)
    assert close == equivariant


def test_absolute_adds_a_sinusoid_to_the_keys():
    none = SelfAttention2D(8, 16, window=3, num_heads=2, positional="none", rngs=nnx.Rngs(4))
    absolute = SelfAttention2D(
        8, 16, window=3, num_heads=2, positional="absolute", rngs=nnx.Rngs(4)
    )
    x = _x((1, 6, 6, 8))
    wq, wk, wv = (m.kernel[...] for m in (absolute.query, absolute.key, absolute.value))
    split = lambda t: t.reshape(1, 6, 6, 2, 8)  # noqa: E731
    pe = np.zeros((6, 6, 16), np.float32)
    for i in range(6):
        for j in range(6):
            for f in range(4):
                freq = 10000.0 ** (-f / 4)
                pe[i, j, f], pe[i, j, 4 + f] = np.sin(i * freq), np.cos(i * freq)
                pe[i, j, 8 + f], pe[i, j, 12 + f] = np.sin(j * freq), np.cos(j * freq)
    chex.assert_trees_all_close(sinusoidal_2d(6, 6, 16), pe, atol=1e-5)
    ref, _ = reference_attention(
        split(x @ wq) / np.sqrt(8.0), split(x @ wk + pe), split(x @ wv), window=3
    )
    chex.assert_trees_all_close(absolute(x), ref.reshape(1, 6, 6, 16), atol=1e-4, rtol=1e-4)
    assert not np.allclose(none(x), absolute(x), atol=1e-3)


def test_qr_layer_passes_no_keys_to_the_op(monkeypatch):
    """logits="qr" does no q·k work: the op gets ``k=None`` (its q·r-only contract, checked
    against the reference in test_attention.py)."""
    import sasa_jax.nn.attention

    seen = []

    def spy(q, k, v, **kwargs):
        seen.append(k)
        return v if not kwargs.get("return_weights") else (v, None)

    monkeypatch.setattr(sasa_jax.nn.attention, "local_attention", spy)
    SelfAttention2D(8, 16, window=3, num_heads=2, logits="qr", rngs=nnx.Rngs(0))(_x((1, 5, 5, 8)))
    assert seen == [None]


@pytest.mark.parametrize("logits, key_content_matters", [("qk+qr", True), ("qr", False)])
def test_qr_logits_ignore_key_content(logits, key_content_matters):
    layer = SelfAttention2D(8, 16, window=3, num_heads=2, logits=logits, rngs=nnx.Rngs(0))
    assert (layer.key is None) == (logits == "qr")
    x = _x((1, 5, 5, 8))
    x_changed = x.at[0, 2, 3].add(3.0)  # a neighbour of the query at (2, 2)
    _, w = layer(x, return_weights=True)
    _, w_changed = layer(x_changed, return_weights=True)
    assert (not np.allclose(w[0, 2, 2], w_changed[0, 2, 2], atol=1e-5)) == key_content_matters


def test_bfloat16_compute_keeps_float32_params():
    layer = SelfAttention2D(8, 16, window=3, num_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = layer(_x((1, 6, 6, 8)))
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    full = SelfAttention2D(8, 16, window=3, num_heads=2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.float32(y), full(_x((1, 6, 6, 8))), atol=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strides=3), "strides"),
        (dict(num_heads=5), "num_heads"),
        (dict(positional="learned"), "positional"),
        (dict(logits="qk"), "logits"),
        (dict(logits="qr", positional="none"), "qr"),
        (dict(border="reflect"), "border"),
        (dict(implementation="magic"), "implementation"),
        (dict(num_heads=16), "even head dim"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfAttention2D(16, 16, rngs=nnx.Rngs(0), **kwargs)


def test_layer_wrong_input_channels():
    with pytest.raises(ValueError, match="expected"):
        SelfAttention2D(16, 16, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 8)))


# ----------------------------------------------------------------------------- the stem


def test_stem_maps_224_to_56():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AttentionStem(rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)
    chex.assert_shape(out, (1, 56, 56, 64))


def test_stem_is_attention_norm_relu_and_block_max():
    stem = AttentionStem(3, 16, num_heads=2, rngs=nnx.Rngs(2))
    x = _x((2, 8, 8, 3))
    y = nnx.relu(stem.norm(stem.attention(x)))
    expected = np.asarray(y).reshape(2, 2, 4, 2, 4, 16).max(axis=(2, 4))
    chex.assert_trees_all_close(stem(x), expected, atol=1e-6)


def test_stem_spatially_aware_attention_matches_hand_computation():
    stem = StemAttention(3, 16, num_heads=2, num_mixtures=3, rngs=nnx.Rngs(2))
    x = _x((2, 8, 8, 3))
    # eq. 9: p(a, b, m) from absolute positions inside the tile, shared across heads.
    emb_row, emb_col = stem.emb_row[...], stem.emb_col[...]
    nu, w_m = stem.mixture_emb[...], stem.value_mixture[...]
    v = np.zeros((2, 8, 8, 16), np.float32)
    for i in range(8):
        for j in range(8):
            a, c = i % 4, j % 4
            p = jax.nn.softmax(nu @ (emb_row[a] + emb_col[c]))
            v[:, i, j] = x[:, i, j] @ jnp.einsum("m,mco->co", p, w_m)  # eq. 8
    q = (x @ stem.query.kernel[...]).reshape(2, 8, 8, 2, 8) / np.sqrt(8.0)
    k = (x @ stem.key.kernel[...]).reshape(2, 8, 8, 2, 8)
    expected, _ = reference_block_attention(
        q, k, v.reshape(2, 8, 8, 2, 8), stem.rel_row[...], stem.rel_col[...], 4
    )
    chex.assert_trees_all_close(stem(x), expected.reshape(2, 8, 8, 16), atol=1e-4, rtol=1e-4)
    p = stem.mixture_weights()
    chex.assert_shape(p, (4, 4, 3))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


def test_stem_zero_query_starts_as_a_block_average_of_the_values():
    stem = StemAttention(3, 16, num_heads=2, zero_query=True, rngs=nnx.Rngs(2))
    x = _x((2, 8, 8, 3))
    y, weights = stem(x, return_weights=True)
    np.testing.assert_allclose(weights, 1.0 / 16, rtol=1e-6)
    v = np.asarray(stem._values(x)).reshape(2, 2, 4, 2, 4, 16).mean(axis=(2, 4))
    expected = np.repeat(np.repeat(v, 4, axis=1), 4, axis=2)
    chex.assert_trees_all_close(y, expected, atol=1e-5)
    assert np.abs(stem.key.kernel[...]).max() > 0  # only W_Q starts at zero


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(StemAttention, 3, 64),
        functools.partial(SlidingStemAttention, 3, 64, window=7),
        functools.partial(SlidingStemAttention, 1, 16, window=7, num_mixtures=49),
    ],
    ids=["paper", "sliding", "sliding_m49"],
)
def test_stem_mixture_weights_start_soft(make):
    """Eq. 9's logits start at unit variance, so no position starts on one mixture (with all
    embeddings at N(0, 1) their std is sqrt(2 e), 11 at e = 64, and the top weight ~0.95)."""
    layer = make(rngs=nnx.Rngs(0))
    emb = layer.emb_row[...][:, None, :] + layer.emb_col[...][None, :, :]
    logits = emb @ layer.mixture_emb[...].T
    assert 0.6 < float(logits.std()) < 1.5
    top = layer.mixture_weights().max(-1)
    assert float(top.mean()) < 0.7
    assert float(top.max()) < 0.99


def test_stem_queries_never_see_other_tiles():
    stem = StemAttention(3, 16, num_heads=2, values="stand_alone", rngs=nnx.Rngs(0))
    x = _x((1, 8, 8, 3))
    y = stem(x)
    y_changed = stem(x.at[0, 4:, :].add(5.0))  # change only the bottom tiles
    np.testing.assert_allclose(y[0, :4], y_changed[0, :4], atol=1e-6)
    assert not np.allclose(y[0, 4:], y_changed[0, 4:], atol=1e-3)


@pytest.mark.parametrize(
    "values, extra",
    [
        ("stand_alone", 3 * 64),
        ("spatial_conv_values", 4 * 4 * 3 * 64),
        ("spatially_aware", 4 * 3 * 64 + 4 * 64 * 2 + 4 * 64),  # W_V^m, emb_row/col, nu
    ],
)
def test_stem_parameter_counts(values, extra):
    stem = nnx.eval_shape(lambda: AttentionStem(values=values, rngs=nnx.Rngs(0)))
    shared = 2 * 3 * 64 + 2 * 7 * 8 + 2 * 64  # W_Q, W_K, rel tables, BN scale and bias
    assert _params(stem) == shared + extra


def test_stem_bad_arguments():
    with pytest.raises(ValueError, match="values"):
        StemAttention(values="conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by block"):
        StemAttention(rngs=nnx.Rngs(0))(jnp.zeros((1, 10, 8, 3)))


def test_block_max_is_max_pool():
    """The stem's pooling (a reshape and a max) gives max_pool's numbers and, without ties,
    its gradient."""
    x = _x((2, 16, 12, 5))
    pool = functools.partial(nnx.max_pool, window_shape=(4, 4), strides=(4, 4))
    np.testing.assert_array_equal(block_max(x, 4), pool(x))
    weights = jnp.arange(5.0)
    grad = jax.grad(lambda x: jnp.sum(block_max(x, 4) * weights))(x)
    ref_grad = jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
    np.testing.assert_array_equal(grad, ref_grad)
