"""The sliding-window attention stem (``model.stem_window``; not the paper's stem), checked
against a hand-written eq. 3 / eq. 8-9 with offsets for positions, and in the model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax.analysis import diagnostics, flops
from sasa_jax.models import AttentionStem, ModelSpec, build_model
from sasa_jax.nn import SlidingStemAttention, image_windows
from sasa_jax.train import config as config_lib


def _reference(params: dict, x, *, window: int, strides: int, heads: int):
    """Forms q, k and every (query, tap) value in full, one query at a time:
    softmax over the in-image taps of q·(k + r_offset), values (sum_m p(offset, m) W_V^m) x."""
    b, height, width, _ = x.shape
    out = params["w_query"].shape[1]
    dim = out // heads
    emb = params["emb_row"][:, None, :] + params["emb_col"][None, :, :]
    p = jax.nn.softmax(emb @ params["mixture_emb"].T, axis=-1)  # [window, window, M]
    half = window // 2
    rows = []
    for i in range(0, height, strides):
        cols = []
        for j in range(0, width, strides):
            q = (x[:, i, j] @ params["w_query"]).reshape(b, heads, dim) / np.sqrt(dim)
            logits, values = [], []
            for a in range(window):
                for c in range(window):
                    ii, jj = i + a - half, j + c - half
                    if not (0 <= ii < height and 0 <= jj < width):
                        continue
                    k = (x[:, ii, jj] @ params["w_key"]).reshape(b, heads, dim)
                    r = jnp.concatenate([params["rel_row"][a], params["rel_col"][c]])
                    logits.append((q * (k + r)).sum(-1))
                    mixed = jnp.einsum("m,mco->co", p[a, c], params["value_mixture"])
                    values.append((x[:, ii, jj] @ mixed).reshape(b, heads, dim))
            weights = jax.nn.softmax(jnp.stack(logits, -1), axis=-1)  # [b, heads, taps]
            cols.append(jnp.einsum("bht,tbhd->bhd", weights, jnp.stack(values)).reshape(b, out))
        rows.append(jnp.stack(cols, 1))
    return jnp.stack(rows, 1)


@pytest.fixture(params=["_values_per_head", "_values_per_mixture"])
def values_form(request, monkeypatch):
    """Each of the layer's two forms of the values (CPU's, the accelerators'), run on CPU."""
    form = getattr(SlidingStemAttention, request.param)
    monkeypatch.setattr(SlidingStemAttention, "weighted_values", form)
    return request.param


def _layer(strides=1, **kwargs):
    kwargs = {"window": 3, "num_heads": 2, "num_mixtures": 3, "zero_query": False, **kwargs}
    return SlidingStemAttention(3, 8, strides=strides, rngs=nnx.Rngs(3), **kwargs)


@pytest.mark.parametrize("strides", [1, 2])
def test_matches_the_hand_written_attention(strides, values_form):
    layer = _layer(strides)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3))
    params = {k: v[...] for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    params = {path[-1]: value for path, value in params.items()}
    expected = _reference(params, x, window=3, strides=strides, heads=2)
    assert layer(x).shape == ((2, 5, 4, 8) if strides == 1 else (2, 3, 2, 8))
    chex.assert_trees_all_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gradients_match_the_hand_written_attention(values_form):
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (1, 3, 3, 3))
    graphdef, params = nnx.split(layer, nnx.Param)
    weights = jax.random.normal(jax.random.key(2), (1, 3, 3, 8))

    def ours(params, x):
        return (nnx.merge(graphdef, params)(x) * weights).sum()

    def reference(params, x):
        flat = {path[-1]: v[...] for path, v in nnx.to_flat_state(params)}
        return (_reference(flat, x, window=3, strides=1, heads=2) * weights).sum()

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(reference, argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_zero_query_weighs_the_in_image_taps_uniformly():
    layer = _layer(zero_query=True)
    layer.capture = True
    x = jax.random.normal(jax.random.key(0), (1, 4, 5, 3))
    _, captured = nnx.capture(layer, nnx.Intermediate)(x)
    weights = np.asarray(captured["attention_weights"][0])  # [1, 4, 5, heads, 9]
    _, valid = image_windows(x, 3)
    expected = valid / valid.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights[0], np.repeat(expected[:, :, None], 2, 2), atol=1e-6)
    assert valid[0, 0].sum() == 4 and valid[1, 1].sum() == 9  # a corner sees 2x2 of 3x3


def test_windows_are_the_shifted_pixels():
    x = jnp.arange(2 * 5 * 6 * 1, dtype=jnp.float32).reshape(2, 5, 6, 1)
    taps, valid = image_windows(x, 3, strides=2)
    assert taps.shape == (2, 3, 3, 9, 1) and valid.shape == (3, 3, 9)
    # query (1, 1) is pixel (2, 2); tap 0 is offset (-1, -1), tap 8 offset (+1, +1)
    assert taps[1, 1, 1, 0, 0] == x[1, 1, 1, 0] and taps[1, 1, 1, 8, 0] == x[1, 3, 3, 0]
    assert not valid[0, 0, 0] and taps[0, 0, 0, 0, 0] == 0  # outside the image: masked, zero


def test_stem_is_the_conv_stems_geometry():
    """window > 0: stride-2 attention, BN, ReLU, 3x3/2 max pool, and so outputs overlap: a
    pixel change reaches two neighbouring outputs (the paper's block stem reaches one)."""
    stem = AttentionStem(3, 8, num_heads=2, window=5, rngs=nnx.Rngs(0))
    stem.eval()
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    y = stem(x)
    expected = nnx.max_pool(
        nnx.relu(stem.norm(stem.attention(x))), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
    )
    assert y.shape == (1, 4, 4, 8)
    chex.assert_trees_all_close(y, expected)
    changed = np.abs(np.asarray(stem(x.at[0, 7, 7].add(10.0)) - y)).max(axis=(0, 3)) > 0
    assert changed.sum() >= 2
    block = AttentionStem(3, 8, num_heads=2, rngs=nnx.Rngs(0))
    block.eval()
    moved = np.abs(np.asarray(block(x.at[0, 7, 7].add(10.0)) - block(x))).max(axis=(0, 3)) > 0
    assert moved.sum() == 1


def test_model_counts_and_flops():
    """A ResNet with stem_window=7 has the block stem's parameters with 7-long tables and
    embeddings in place of the 7-long tables and 4-long embeddings; its stem maps 48 -> 12."""
    spec = dict(depth=26, variant="full_attention", width_multiplier=0.25, num_classes=10)

    def count(**fields):
        model = nnx.eval_shape(lambda: build_model(ModelSpec(**spec, **fields), rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), model

    (block, _), (sliding, model) = count(), count(stem_window=7)
    assert sliding - block == 2 * (7 - 4) * 16  # emb_row and emb_col, width 16
    _, h, w = flops.module_flops(model.stem, 48, 48)
    assert (h, w) == (12, 12)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(variant="full_attention", stem_window=-1), "stem_window must be >= 0"),
        (dict(variant="full_attention", stem_window=7, stem_values="stand_alone"), "spatially"),
        (dict(variant="conv_stem_attention", stem_window=7), "applies to the attention stem"),
    ],
)
def test_bad_stem_window_is_refused_before_building(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**fields)


def test_config_argument_selects_it():
    config = config_lib.from_file(
        "configs/digits_clutter.py", "variant=full_attention,stem_window=7"
    )
    assert ModelSpec.from_config(config.model).stem_window == 7


def test_diagnostics_read_the_sliding_stem():
    spec = ModelSpec(
        depth=26, variant="full_attention", width_multiplier=0.25, num_classes=10, stem_window=5
    )
    model = build_model(spec, rngs=nnx.Rngs(0))
    model.eval()
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    stem = diagnostics.attention_stats(model, images)["stem/attention"]
    assert stem["entropy"] == pytest.approx(1.0, abs=1e-6)  # W_Q = 0: uniform over the taps
    assert stem["in_rms"] == pytest.approx(float(np.sqrt(np.mean(np.square(images)))), 1e-5)
    assert 0 < stem["mix_entropy"] <= 1
