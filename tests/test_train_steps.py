"""The optimisers a config selects, against optax's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sasa_jax import config_lib
from sasa_jax.train_steps import create_optimizer, decay_mask


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 4))},
        "norm": {"scale": jax.random.normal(keys[1], (4,)), "bias": jnp.ones((4,))},
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_learning_rate_times_direction_is_optax(optimizer):
    config = config_lib.default_config()
    config.optimizer = optimizer
    config.weight_decay = 0.1
    params, rate = _params(), 0.05
    reference = (
        optax.sgd(rate, momentum=0.9, nesterov=True)
        if optimizer == "sgd"
        else optax.adamw(rate, weight_decay=0.1, mask=decay_mask)
    )
    if optimizer == "sgd":
        reference = optax.chain(optax.add_decayed_weights(0.1, mask=decay_mask), reference)
    ours = create_optimizer(config)
    state, ref_state, p, q = ours.init(params), reference.init(params), params, params
    for step in range(3):
        grads = jax.tree.map(lambda x, s=step: jnp.sin(x * (s + 1)), p)
        direction, state = ours.update(grads, state, p)
        p = jax.tree.map(lambda x, d: x - rate * d, p, direction)
        updates, ref_state = reference.update(
            jax.tree.map(lambda x, s=step: jnp.sin(x * (s + 1)), q), ref_state, q
        )
        q = optax.apply_updates(q, updates)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer():
    config = config_lib.default_config()
    config.optimizer = "lion"
    with pytest.raises(ValueError, match="config.optimizer must be one of"):
        create_optimizer(config)
