"""The training recipe on the real models and the real train step, each against an independent
computation: which parameters are decayed, the learning rate, SGD-Nesterov and AdamW against
optax, label smoothing, the EMA, batch-norm statistics, the class prior, gradient
accumulation, tracing once, and the bf16-compute / f32-parameter contract."""

from __future__ import annotations

import functools
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sasa_jax import data, tasks
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.models.heads import class_prior_bias
from sasa_jax.nn.attention import SelfAttention2D
from sasa_jax.nn.norm import BatchNorm
from sasa_jax.nn.stem_attention import StemAttention
from sasa_jax.tasks import detection as detection_task
from sasa_jax.train import config as config_lib
from sasa_jax.train.steps import (
    accumulated_gradients,
    apply_gradients,
    create_optimizer,
    create_train_state,
    decay_mask,
    eval_step,
    learning_rate_schedule,
    train_step,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- which parameters decay


def _expected_decay(model: nnx.Module) -> dict[tuple, bool]:
    """Path -> decayed?, from the module graph (not from names): batch-norm parameters and the
    ``bias`` of linear layers and convolutions are exempt; kernels, relative tables and the
    stem's value mixture and embeddings are decayed. Any other parameter kind fails."""
    expected = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        for name, value in vars(module).items():
            if not isinstance(value, nnx.Param):
                continue
            if isinstance(module, nnx.BatchNorm):
                decayed = False
            elif isinstance(module, nnx.Linear | nnx.Conv):
                decayed = value is module.kernel
                assert decayed or value is module.bias
            elif isinstance(module, SelfAttention2D | StemAttention):
                kinds = ("rel_row", "rel_col", "value_mixture", "emb_row", "emb_col", "mixture_emb")
                assert name in kinds, f"unclassified parameter {name} of {type(module).__name__}"
                decayed = True
            else:
                raise AssertionError(f"unclassified parameter {name} of {type(module).__name__}")
            expected[(*path, name)] = decayed
    return expected


def _mask_by_path(model: nnx.Module) -> dict[tuple, bool]:
    mask = decay_mask(nnx.state(model, nnx.Param))
    return {path: _bool_leaf(flag) for path, flag in nnx.to_flat_state(mask)}


def _bool_leaf(value) -> bool:
    return bool(value.get_value() if isinstance(value, nnx.Variable) else value)


CLASSIFIERS = [
    dict(variant=v, stem_values=s)
    for v, s in [
        ("baseline", "spatially_aware"),
        ("conv_stem_attention", "spatially_aware"),
        ("full_attention", "spatially_aware"),
        ("full_attention", "stand_alone"),
        ("full_attention", "spatial_conv_values"),
    ]
]


@pytest.mark.parametrize("fields", CLASSIFIERS, ids=lambda f: "-".join(f.values()))
def test_decay_mask_on_every_resnet_variant(fields):
    spec = ModelSpec(depth=26, width_multiplier=0.25, num_classes=10, **fields)
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    mask = _mask_by_path(model)
    expected = _expected_decay(model)
    assert mask == expected
    assert 0 < sum(expected.values()) < len(expected)


@pytest.mark.parametrize("heads", ["conv", "attention"])
def test_decay_mask_on_retinanet(heads):
    config = config_lib.from_file(ROOT / "configs/digits_detection.py", f"heads={heads}")
    task = detection_task.DetectionTask(config, 10)
    model = nnx.eval_shape(lambda: task.create_model(0))
    mask = _mask_by_path(model)
    assert mask == _expected_decay(model)
    class_bias = ("class_head", "output", "bias")
    assert mask[class_bias] is False


def test_class_prior_at_init_in_the_train_state():
    """The class output's bias starts at -log((1 - 0.01) / 0.01) in the state training
    begins from, for conv and attention heads."""
    for heads in ("conv", "attention"):
        config = config_lib.from_file(ROOT / "configs/digits_detection.py", f"heads={heads}")
        model = detection_task.DetectionTask(config, 10).create_model(0)
        _, _, state = create_train_state(model, create_optimizer(config), config)
        bias = state.params["class_head"]["output"]["bias"].get_value()
        np.testing.assert_allclose(bias, -math.log(99.0), rtol=1e-6)
        assert class_prior_bias(0.01) == pytest.approx(-math.log(99.0))


# ----------------------------------------------------------------- a real train step


def _digits_config(**fields):
    config = config_lib.from_file(ROOT / "configs/digits.py", "window=3")
    for name, value in fields.items():
        if "." in name:
            config.model[name.split(".")[1]] = value
        else:
            config[name] = value
    return config


def _batch(size=8, image=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.integers(0, 256, (size, image, image, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (size,), np.int32)),
    }


def _setup(config, batch_norm=BatchNorm):
    task = tasks.ClassificationTask(config, 10)
    spec = ModelSpec.from_config(config.model, num_classes=10)
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = build_model(spec, rngs=nnx.Rngs(config.seed), dtype=dtype, batch_norm=batch_norm)
    tx = create_optimizer(config)
    graphdef, eval_graph, state = create_train_state(model, tx, config)
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, config=config, task=task)
    )
    return task, tx, graphdef, eval_graph, state, step


def _grads(graphdef, state, batch, task, config):
    """The gradients the step takes, computed on their own (the step's gradient function,
    jitted alone): the optimiser comparisons below start from the same gradients."""
    grads = functools.partial(accumulated_gradients, graphdef, config=config, task=task)
    return jax.jit(grads)(state.params, state.batch_stats, batch)[0]


def _independent_mask(graphdef, state):
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    expected = _expected_decay(model)
    params = state.params
    return nnx.from_flat_state(
        [(path, nnx.Param(expected[path])) for path, _ in nnx.to_flat_state(params)]
    )


def test_learning_rate_schedule_is_warmup_then_cosine():
    config = _digits_config(base_learning_rate=0.4, batch_size=64)
    total, warmup = 100, 10
    peak = 0.4 * 64 / 256
    schedule = learning_rate_schedule(config, total, warmup)
    for step in (0, 1, 5, 10, 11, 40, 99):
        if step < warmup:
            expected = peak * step / warmup
        else:
            expected = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimiser_steps_equal_optax_on_the_real_model(optimizer):
    """SGD with Nesterov momentum after L2 decay, and AdamW with decoupled decay: two steps of
    the trainer's update (``apply_gradients``) against optax's own optimisers on the same real
    parameters and gradients, leaf by leaf, with the decay mask taken from the module graph.
    (Adam divides by the gradients' scale, so both sides take the very same gradients.)"""
    config = _digits_config(optimizer=optimizer, weight_decay=0.1, ema_decay=0.0)
    task, tx, graphdef, _, state, _ = _setup(config)
    rate = 0.05
    mask = _independent_mask(graphdef, state)
    if optimizer == "sgd":
        reference = optax.chain(
            optax.add_decayed_weights(0.1, mask=mask),
            optax.sgd(rate, momentum=config.momentum, nesterov=True),
        )
    else:
        reference = optax.adamw(rate, weight_decay=0.1, mask=mask)
    ref_params, ref_state = state.params, reference.init(state.params)
    update = jax.jit(functools.partial(apply_gradients, tx=tx, config=config))
    for seed in range(2):
        grads = _grads(graphdef, state, _batch(seed=seed), task, config)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        state = update(state, grads, state.batch_stats, jnp.float32(rate))
        chex.assert_trees_all_close(state.params, ref_params, rtol=2e-5, atol=2e-6)
        ref_params = state.params  # the next gradients are taken at the step's parameters


def test_train_step_is_sgd_nesterov_on_its_own_gradients():
    """Two real train steps (gradients, then the update) against the same gradients taken
    on their own and optax's SGD with Nesterov momentum after masked L2 decay."""
    config = _digits_config(weight_decay=0.1, ema_decay=0.0)
    task, _, graphdef, _, state, step = _setup(config)
    mask = _independent_mask(graphdef, state)
    reference = optax.chain(
        optax.add_decayed_weights(0.1, mask=mask), optax.sgd(0.05, momentum=0.9, nesterov=True)
    )
    ref_state = reference.init(state.params)
    for seed in range(2):
        batch = _batch(seed=seed)
        grads = _grads(graphdef, state, batch, task, config)
        updates, ref_state = reference.update(grads, ref_state, state.params)
        expected = optax.apply_updates(state.params, updates)
        state, _ = step(state, batch, jnp.float32(0.05))
        chex.assert_trees_all_close(state.params, expected, rtol=2e-5, atol=2e-6)


def test_weight_decay_reaches_exactly_the_decayed_parameters():
    """One SGD step with weight decay 0 and one with 1.0 from the same state and batch: the
    batch-norm scales and offsets and every bias come out bitwise equal, every kernel
    differs."""
    results = []
    for decay in (0.0, 1.0):
        config = _digits_config(weight_decay=decay, ema_decay=0.0)
        _, _, graphdef, _, state, step = _setup(config)
        results.append(step(state, _batch(), jnp.float32(0.1))[0].params)
    model = nnx.merge(graphdef, results[0], state.batch_stats)
    expected = _expected_decay(model)
    flat = [dict(nnx.to_flat_state(p)) for p in results]
    for path, decayed in expected.items():
        a, b = (np.asarray(f[path].get_value()) for f in flat)
        if decayed:
            assert not np.array_equal(a, b), path
        else:
            np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_label_smoothing_in_the_step_loss():
    """The step's loss is the cross-entropy against (1 - 0.1) * one_hot + 0.1 / classes (the
    ImageNet config's 0.1), on the logits of the real model in train mode."""
    config = config_lib.from_file(
        ROOT / "configs/imagenet.py", "depth=26,width=0.25,window=3,num_classes=10"
    )
    config.half_precision = False
    config.ema_decay = 0.0
    task, _, graphdef, _, state, step = _setup(config)
    batch = _batch()
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits = np.asarray(model(data.normalize(batch["image"])), np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
        - logits.max(-1, keepdims=True)
    )
    targets = np.full(logits.shape, config.label_smoothing / 10)
    targets[np.arange(8), np.asarray(batch["label"])] += 1 - config.label_smoothing
    expected = -(targets * log_probs).sum(-1).mean()
    _, metrics = step(state, batch, jnp.float32(0.0))
    assert config.label_smoothing == 0.1
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


def test_ema_follows_its_formula_and_eval_uses_it():
    config = _digits_config(ema_decay=0.9)
    task, _, graphdef, eval_graph, state, step = _setup(config)
    before = state.ema_params
    state, _ = step(state, _batch(), jnp.float32(0.1))
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before, state.params)
    chex.assert_trees_all_close(state.ema_params, expected, rtol=1e-6, atol=1e-7)
    batch = {**_batch(seed=3), "mask": jnp.ones((8,), bool)}
    outputs = jax.jit(functools.partial(eval_step, graphdef=eval_graph, config=config, task=task))(
        state, batch
    )
    images = data.normalize(batch["image"])
    for params, same in ((state.ema_params, True), (state.params, False)):
        model = nnx.merge(eval_graph, params, state.batch_stats)
        loss = task.eval_outputs(model, images, batch)["loss"]
        assert np.isclose(float(outputs["loss"]), float(loss), rtol=1e-5) == same


def test_batch_norm_statistics_follow_the_configured_momentum():
    """After one step, the stem's running mean and variance are ``m * initial + (1 - m) *``
    the batch's (biased) statistics of the stem convolution's output, m = model.bn_momentum;
    zero_init_residual starts every block's last batch-norm scale at 0, the others at 1."""
    config = _digits_config(**{"model.bn_momentum": 0.8, "ema_decay": 0.0})
    _, _, graphdef, _, state, step = _setup(config)
    batch = _batch()
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    conv = np.asarray(model.stem.conv(data.normalize(batch["image"])), np.float64)
    after = step(state, batch, jnp.float32(0.1))[0].batch_stats
    stem = after["stem"]["norm"]
    np.testing.assert_allclose(stem["mean"].get_value(), 0.2 * conv.mean((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(stem["var"].get_value(), 0.8 + 0.2 * conv.var((0, 1, 2)), rtol=1e-4)
    for stage in model.stages:
        for block in stage:
            np.testing.assert_array_equal(block.norm3.scale.get_value(), 0.0)
            for norm in (block.norm1, block.norm2):
                np.testing.assert_array_equal(norm.scale.get_value(), 1.0)


# ----------------------------------------------------------------- gradient accumulation


class AffineNorm(BatchNorm):
    """Batch norm that always normalises by its running statistics: a per-channel affine map
    with no cross-example term, so a ResNet with it has per-example gradients."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        return super().__call__(x, use_running_average=True, mask=mask)


def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch():
    """Without batch statistics, 4 micro-batches of 4 give the gradients and metrics of the
    batch of 16, and two train steps of each end at the same weights."""
    batch = _batch(size=16)
    results = []
    for count in (1, 4):
        config = _digits_config(grad_accum_steps=count, ema_decay=0.0, weight_decay=1e-3)
        task, _, graphdef, _, state, step = _setup(config, batch_norm=AffineNorm)
        grads, metrics, _ = jax.jit(
            functools.partial(accumulated_gradients, graphdef, config=config, task=task)
        )(state.params, state.batch_stats, batch)
        for seed in range(2):
            state, _ = step(state, _batch(size=16, seed=seed), jnp.float32(0.05))
        results.append((grads, metrics, state.params))
    (grads, metrics, params), (micro_grads, micro_metrics, micro_params) = results
    chex.assert_trees_all_close(micro_grads, grads, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(micro_metrics, metrics, rtol=1e-5)
    chex.assert_trees_all_close(micro_params, params, rtol=1e-4, atol=1e-6)


def test_accumulation_with_batch_norm_uses_each_micro_batch_statistics():
    """With batch norm, each micro-batch is normalised by its own statistics, and the
    running statistics are updated once per micro-batch, in order."""
    config = _digits_config(grad_accum_steps=2, ema_decay=0.0, **{"model.bn_momentum": 0.5})
    task, _, graphdef, _, state, _ = _setup(config)
    batch = _batch(size=8)
    _, _, stats = accumulated_gradients(
        graphdef, state.params, state.batch_stats, batch, config=config, task=task
    )
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    images = np.asarray(data.normalize(batch["image"]))
    means = [np.asarray(model.stem.conv(images[i::2])).mean((0, 1, 2)) for i in range(2)]
    expected = 0.5 * (0.5 * 0.0 + 0.5 * means[0]) + 0.5 * means[1]
    np.testing.assert_allclose(stats["stem"]["norm"]["mean"].get_value(), expected, rtol=1e-4)


# ------------------------------------------------------- tracing once, and dtypes


def test_the_train_step_and_the_op_trace_once():
    """Steps with new batches and learning rates reuse one trace (``chex.assert_max_traces``
    raises on a second), and so does a SASA layer called on new inputs."""
    config = _digits_config(ema_decay=0.0)
    task = tasks.ClassificationTask(config, 10)
    model = build_model(
        ModelSpec.from_config(config.model, num_classes=10), rngs=nnx.Rngs(0), batch_norm=BatchNorm
    )
    tx = create_optimizer(config)
    graphdef, _, state = create_train_state(model, tx, config)

    def one_step(state, batch, rate):
        return train_step(state, batch, rate, graphdef=graphdef, tx=tx, config=config, task=task)

    step = jax.jit(chex.assert_max_traces(one_step, n=1))
    for seed in range(3):
        state, _ = step(state, _batch(seed=seed), jnp.float32(0.1 * (seed + 1)))
    layer = SelfAttention2D(16, 16, window=3, num_heads=4, rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)

    def attend(params, x):
        return nnx.merge(graph, params)(x)

    apply = jax.jit(chex.assert_max_traces(attend, n=1))
    for seed in range(3):
        apply(params, jax.random.normal(jax.random.key(seed), (2, 8, 8, 16)))


def test_half_precision_computes_in_bfloat16_and_keeps_float32_state():
    config = _digits_config(half_precision=True, ema_decay=0.5)
    task, _, graphdef, _, state, step = _setup(config)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    images = data.normalize(_batch()["image"], dtype=jnp.bfloat16)
    features = jax.eval_shape(lambda m, x: m.features(x), model, images)
    chex.assert_type(list(features.values()), jnp.bfloat16)
    chex.assert_type(jax.eval_shape(lambda m, x: m(x), model, images), jnp.float32)
    new, metrics = step(state, _batch(), jnp.float32(0.1))
    for tree in (new.params, new.batch_stats, new.ema_params, new.opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        chex.assert_type(floats, jnp.float32)
    chex.assert_trees_all_equal_shapes(new.params, state.params)
    assert np.isfinite(float(metrics["loss"]))


def test_unknown_optimizer():
    config = config_lib.default_config()
    config.optimizer = "lion"
    with pytest.raises(ValueError, match="config.optimizer must be one of"):
        create_optimizer(config)
