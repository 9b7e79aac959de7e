"""``config.learning_rate_scales`` on the real model and optimiser: the parameters under a
prefix step at their own learning rate, against SGD-Nesterov with L2 decay written out in
numpy; mistakes in the option are refused before anything compiles."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax import tasks
from sasa_jax.train import config as config_lib
from sasa_jax.train.steps import (
    accumulated_gradients,
    apply_gradients,
    create_optimizer,
    create_train_state,
    learning_rate_scales,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_DECAY = ("bias", "scale")


def _state(scales: str, variant: str = "conv_stem_attention"):
    config = config_lib.from_file(ROOT / "configs/digits.py", f"window=3,variant={variant}")
    config.weight_decay = 0.1
    config.ema_decay = 0.0
    config.learning_rate_scales = scales
    task = tasks.ClassificationTask(config, 10)
    tx = create_optimizer(config)
    graphdef, _, state = create_train_state(task.create_model(0), tx, config)
    return config, task, tx, graphdef, state


def _flat(params) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, key)): np.asarray(value.get_value(), np.float64)
        for key, value in nnx.to_flat_state(params)
    }


def _numpy_sgd(params, grads, scale_of, *, rate, decay, momentum, steps):
    """SGD with Nesterov momentum after L2 decay (not on ``bias``/``scale``), each parameter at
    ``rate * scale_of(path)``: the update PyTorch's parameter groups make."""
    params, trace = dict(params), {path: np.zeros_like(p) for path, p in params.items()}
    for _ in range(steps):
        for path, p in params.items():
            name = path.split("/")[-1]
            d = grads[path] + (0.0 if name in NO_DECAY else decay) * p
            trace[path] = momentum * trace[path] + d
            params[path] = p - rate * scale_of(path) * (d + momentum * trace[path])
    return params


def test_stem_steps_at_its_own_rate_on_the_real_model():
    """Two optimiser steps with ``stem:0.25,head:3`` on the real full-attention model's
    gradients: every parameter of the attention stem moves at a quarter of the rate, the
    classifier at three times, the rest at the schedule's rate, as the numpy reference says."""
    config, task, tx, graphdef, state = _state("stem:0.25,head:3", "full_attention")
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (4,), np.int32)),
    }
    gradients = functools.partial(accumulated_gradients, graphdef, config=config, task=task)
    grads = jax.jit(gradients)(state.params, state.batch_stats, batch)[0]
    step = jax.jit(functools.partial(apply_gradients, tx=tx, config=config))
    after = state
    for _ in range(2):
        after = step(after, grads, state.batch_stats, jnp.float32(0.05))

    def scale_of(path):
        return {"stem": 0.25, "head": 3.0}.get(path.split("/")[0], 1.0)

    before, gradient = _flat(state.params), _flat(grads)
    expected = _numpy_sgd(before, gradient, scale_of, rate=0.05, decay=0.1, momentum=0.9, steps=2)
    got = _flat(after.params)
    assert any(p.startswith("stem/") for p in got) and any(p.startswith("head/") for p in got)
    for path, value in got.items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-6, err_msg=path)
        assert np.abs(value - before[path]).max() > 0 or not np.abs(gradient[path]).max(), path


def test_scales_parse_and_default_to_none():
    assert learning_rate_scales("") == {}
    assert learning_rate_scales("stem:0.25, fpn/outputs:2") == {"stem": 0.25, "fpn/outputs": 2.0}


@pytest.mark.parametrize("text", ["stem", "stem:x", ":2", "stem:-1", "stem:1,stem:2"])
def test_malformed_scales_are_refused(text):
    config = config_lib.from_file(ROOT / "configs/digits.py")
    config.learning_rate_scales = text
    with pytest.raises(ValueError, match="PREFIX:SCALE"):
        create_optimizer(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stme:0.5", r"no parameter lies under \['stme'\].*'stem'"),
        ("stem:1,stem/conv:2", "all match"),
    ],
)
def test_prefixes_must_match_one_way_before_compiling(text, message):
    """A misspelt prefix, or two prefixes over one parameter, fail when the train state is
    built (``tx.init``), which is before the step compiles."""
    with pytest.raises(ValueError, match=message):
        _state(text)
