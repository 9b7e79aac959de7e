"""Attention ResNets: shapes, parameter counts, and what the config passes through."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax.analysis.flops import module_flops
from sasa_jax.models import (
    STAGE_SIZES,
    AttentionStem,
    ConvStem,
    ModelSpec,
    PatchStem,
    build_model,
)
from sasa_jax.nn import Conv1x1
from sasa_jax.nn.attention import SelfAttention2D


def _params(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _abstract(**spec):
    return nnx.eval_shape(lambda: build_model(ModelSpec(**spec), rngs=nnx.Rngs(0)))


TINY = dict(depth=26, width_multiplier=0.25, num_classes=10, window=3)


def _apply(model, x, train: bool):
    """The model's logits and features in one compiled call, in train or eval mode."""
    model.train() if train else model.eval()
    return nnx.jit(lambda m, x: (m(x), m.features(x)))(model, x)


def _shapes(spec: ModelSpec, x, train: bool, dtype=None):
    """The logits' and features' shapes and dtypes, abstractly (nothing is computed)."""
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0), dtype=dtype))
    model.train() if train else model.eval()
    graphdef, state = nnx.split(model)

    def apply(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), model.features(x)

    return jax.eval_shape(apply, state, x)


@pytest.mark.parametrize("variant", ["baseline", "conv_stem_attention", "full_attention"])
@pytest.mark.parametrize("train", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_tiny_variant_shapes(variant, train):
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits, features = _shapes(ModelSpec(variant=variant, **TINY), x, train)
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    chex.assert_shape(
        [features[k] for k in ("c2", "c3", "c4", "c5")],
        [(2, 8, 8, 64), (2, 4, 4, 128), (2, 2, 2, 256), (2, 1, 1, 512)],
    )


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv1x1_matches_nnx_conv(strides, size, use_bias):
    conv = Conv1x1(6, 5, strides=strides, use_bias=use_bias, rngs=nnx.Rngs(0))
    reference = nnx.Conv(6, 5, (1, 1), strides=strides, use_bias=use_bias, rngs=nnx.Rngs(1))
    nnx.update(reference, nnx.state(conv))
    if use_bias:
        conv.bias[...] = reference.bias[...] = jnp.arange(5.0)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    chex.assert_trees_all_close(conv(x), reference(x), rtol=1e-5, atol=1e-6)
    grads = [jax.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m) for m in (conv, reference)]
    chex.assert_trees_all_close(nnx.state(grads[0]), nnx.state(grads[1]), rtol=1e-5, atol=1e-5)


def test_batch_statistics_update_only_in_train_mode():
    model = build_model(ModelSpec(variant="full_attention", **TINY), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)) + 3.0
    before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    _apply(model, x, train=False)
    chex.assert_trees_all_equal(before, nnx.state(model, nnx.BatchStat))
    _apply(model, x, train=True)
    after = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    pairs = zip(jax.tree.leaves(before), after, strict=True)
    changed = [not np.array_equal(a, b) for a, b in pairs]
    assert all(changed)  # every batch norm, the attention stem's too


def test_baseline_resnet50_has_the_standard_parameter_count():
    # torchvision's resnet50 (the standard v1.5 model) has 25,557,032 parameters.
    assert _params(_abstract(depth=50, variant="baseline")) == 25_557_032


@pytest.mark.parametrize("depth", [26, pytest.param(38, marks=pytest.mark.slow), 50])
def test_attention_parameter_arithmetic(depth):
    """Each 3x3 conv of width w (9w^2) becomes Q/K/V (3w^2) plus two 7-row tables of w/16."""
    saved = 0
    for blocks, width in zip(STAGE_SIZES[depth], (64, 128, 256, 512), strict=True):
        saved += blocks * (9 * width**2 - 3 * width**2 - 2 * 7 * (width // 8 // 2))
    baseline = _params(_abstract(depth=depth, variant="baseline"))
    attention = _params(_abstract(depth=depth, variant="conv_stem_attention"))
    assert baseline - attention == saved


def test_full_attention_swaps_only_the_stem():
    conv_stem = _abstract(depth=26, variant="conv_stem_attention")
    full = _abstract(depth=26, variant="full_attention")
    assert isinstance(conv_stem.stem, ConvStem) and isinstance(full.stem, AttentionStem)
    conv_stem_params = 7 * 7 * 3 * 64 + 2 * 64  # conv + BN
    assert _params(conv_stem) - conv_stem_params == _params(full) - _params(full.stem)


def test_patch_stem_is_a_conv_on_each_tile():
    """model.stem="patch": each output is ReLU(BN(W . tile)) of its own block x block tile,
    checked against the tiles cut out by a reshape."""
    stem = PatchStem(2, 8, block=4, rngs=nnx.Rngs(1))
    stem.eval()  # at init the norm's eval mode divides by sqrt(1 + eps)
    x = jax.random.normal(jax.random.key(2), (2, 12, 16, 2))
    tiles = x.reshape(2, 3, 4, 4, 4, 2).transpose(0, 1, 3, 2, 4, 5)  # [b, i, j, a, b, c]
    reference = jnp.einsum("bijklc,klco->bijo", tiles, stem.conv.kernel[...])
    reference = jax.nn.relu(reference / jnp.sqrt(1.0 + stem.norm.epsilon))
    chex.assert_trees_all_close(stem(x), reference, rtol=1e-5, atol=1e-5)
    assert module_flops(stem, 12, 16) == (2 * 3 * 4 * 16 * 2 * 8, 3, 4)
    with pytest.raises(ValueError, match="divisible by block=4"):
        stem(x[:, :10])


def test_a_wider_patch_kernel_sees_each_tile_centred_in_an_overlapping_window():
    """kernel=8, block=4: output (i, j) is ReLU(BN(W . x[4i-2 : 4i+6, 4j-2 : 4j+6])), zeros
    outside the image, by hand from a padded copy; the output size stays (h / 4, w / 4)."""
    stem = PatchStem(2, 8, block=4, kernel=8, rngs=nnx.Rngs(1))
    stem.eval()
    x = jax.random.normal(jax.random.key(2), (2, 12, 16, 2))
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    windows = jnp.stack(
        [
            jnp.stack([padded[:, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8] for j in range(4)], 1)
            for i in range(3)
        ],
        1,
    )  # [b, i, j, 8, 8, c]
    reference = jnp.einsum("bijklc,klco->bijo", windows, stem.conv.kernel[...])
    reference = jax.nn.relu(reference / jnp.sqrt(1.0 + stem.norm.epsilon))
    chex.assert_trees_all_close(stem(x), reference, rtol=1e-5, atol=1e-5)
    assert module_flops(stem, 12, 16) == (2 * 3 * 4 * 64 * 2 * 8, 3, 4)
    with pytest.raises(ValueError, match="kernel >= block"):
        PatchStem(2, 8, block=4, kernel=3, rngs=nnx.Rngs(1))


def test_conv_stem_average_pool_averages_each_window_inside_the_map():
    """pool="avg": output (i, j) is the mean of the 3x3 window at (2i, 2j) of ReLU(BN(conv)),
    over the pixels inside the map only (by hand from the unpooled map); "max" is the max."""
    stems = {kind: ConvStem(2, 8, pool=kind, rngs=nnx.Rngs(1)) for kind in ("max", "avg")}
    x = jax.random.normal(jax.random.key(2), (2, 14, 10, 2))
    for stem in stems.values():
        stem.eval()
    unpooled = np.asarray(nnx.relu(stems["avg"].norm(stems["avg"].conv(x))))  # [2, 7, 5, 8]
    h, w = unpooled.shape[1:3]
    windows = [
        [
            unpooled[:, max(2 * i - 1, 0) : 2 * i + 2, max(2 * j - 1, 0) : 2 * j + 2]
            for j in range(3)
        ]
        for i in range(4)
    ]
    mean = np.stack([np.stack([w_.mean((1, 2)) for w_ in row], 1) for row in windows], 1)
    top = np.stack([np.stack([w_.max((1, 2)) for w_ in row], 1) for row in windows], 1)
    assert (h, w) == (7, 5)
    chex.assert_trees_all_close(stems["avg"](x), mean, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(stems["max"](x), top, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one of"):
        ConvStem(2, 8, pool="min", rngs=nnx.Rngs(1))


def test_stem_pool_spec_reaches_the_conv_stem_only():
    model = _abstract(depth=26, variant="conv_stem_attention", stem_pool="avg")
    assert isinstance(model.stem, ConvStem) and model.stem.pool == "avg"
    assert _params(model) == _params(_abstract(depth=26, variant="conv_stem_attention"))
    with pytest.raises(ValueError, match="applies to the conv stem"):
        ModelSpec(variant="full_attention", stem_pool="avg")
    with pytest.raises(ValueError, match="model.stem_pool must be one of"):
        ModelSpec(stem_pool="sum")


def test_patch_stem_spec_swaps_only_the_stem():
    full = _abstract(depth=26, variant="full_attention")
    patch = _abstract(depth=26, variant="full_attention", stem="patch")
    assert isinstance(patch.stem, PatchStem) and patch.stem.block == 4
    assert _params(patch) - (4 * 4 * 3 * 64 + 2 * 64) == _params(full) - _params(full.stem)
    wide = _abstract(depth=26, variant="full_attention", stem="patch", stem_patch_kernel=12)
    assert _params(wide) - _params(patch) == (12 * 12 - 4 * 4) * 3 * 64
    with pytest.raises(ValueError, match="applies to the patch stem"):
        ModelSpec(variant="full_attention", stem_patch_kernel=8)
    with pytest.raises(ValueError, match="0 or >= stem_block"):
        ModelSpec(variant="full_attention", stem="patch", stem_patch_kernel=2)


def test_per_stage_choice_and_pass_through():
    model = _abstract(
        depth=26,
        attention_stages="34",
        window=5,
        positional="absolute",
        border="zeros",
        logits="qk+qr",
        num_heads=4,
    )
    kinds = [type(stage[0].spatial).__name__ for stage in model.stages]
    assert kinds == ["Conv", "Conv", "SelfAttention2D", "SelfAttention2D"]
    layer = model.stages[2][0].spatial
    assert isinstance(layer, SelfAttention2D)
    assert (layer.window, layer.positional, layer.border, layer.num_heads, layer.strides) == (
        (5, 5),
        "absolute",
        "zeros",
        4,
        2,
    )
    assert model.stages[2][1].spatial.strides == 1


def test_qr_logits_and_width_multiplier_pass_through():
    model = _abstract(depth=26, variant="conv_stem_attention", logits="qr", width_multiplier=0.5)
    layer = model.stages[0][0].spatial
    assert layer.key is None and layer.in_features == 32


def test_norm_options_and_zero_init():
    model = build_model(
        ModelSpec(bn_momentum=0.99, bn_epsilon=1e-3, zero_init_residual=True, **TINY),
        rngs=nnx.Rngs(0),
    )
    assert type(model.stages[0][0].norm1) is nnx.BatchNorm  # unless the caller injects one
    block = model.stages[0][0]
    assert (block.norm1.momentum, block.norm1.epsilon) == (0.99, 1e-3)
    np.testing.assert_array_equal(block.norm3.scale[...], 0.0)
    np.testing.assert_array_equal(block.norm1.scale[...], 1.0)
    plain = build_model(ModelSpec(zero_init_residual=False, **TINY), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain.stages[0][0].norm3.scale[...], 1.0)


def test_bfloat16_compute_dtype():
    spec = ModelSpec(variant="full_attention", **TINY)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits, features = _shapes(spec, x, train=False, dtype=jnp.bfloat16)
    assert features["c5"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "spec, match",
    [
        (dict(depth=42), "depth"),
        (dict(variant="resnet"), "variant"),
        (dict(attention_stages="15"), "attention_stages"),
        (dict(stem="patchify"), "model.stem must be one of"),
        (dict(stem_values="conv"), "stem_values"),
        (dict(variant="full_attention", width_multiplier=0.125), "heads of even size"),
        (dict(width_multiplier=0.3), "width_multiplier"),
    ],
)
def test_bad_specs_raise_value_error(spec, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**spec)  # checked once, when the spec is made


def test_unknown_model_config_field():
    with pytest.raises(ValueError, match="unknown model config"):
        ModelSpec.from_config({"depth": 50, "windw": 7})
