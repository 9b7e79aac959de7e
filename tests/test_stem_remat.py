"""``model.stem_remat``: the stem's forward recomputed in the backward pass. The real train
step takes the same steps with it as without, and its compiled program runs the stem's
attention forward once more (the recomputation)."""

from __future__ import annotations

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax import tasks
from sasa_jax.attention.native_build import STEM_FORWARD_TARGET
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.nn.norm import BatchNorm
from sasa_jax.train import config as config_lib
from sasa_jax.train.steps import create_optimizer, create_train_state, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _step(argument: str, remat: bool):
    """The digits config's real train step (jitted) and initial state."""
    config = config_lib.from_file(ROOT / "configs/digits.py", argument)
    config.model.stem_remat = remat
    config.model.implementation = "native"
    model = build_model(
        ModelSpec.from_config(config.model, num_classes=10), rngs=nnx.Rngs(0), batch_norm=BatchNorm
    )
    tx = create_optimizer(config)
    graphdef, _, state = create_train_state(model, tx, config)
    task = tasks.ClassificationTask(config, 10)
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config, task=task)
    return jax.jit(step), state


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (8,), np.int32)),
    }


@pytest.mark.parametrize("argument", ["variant=full_attention", "variant=conv_stem_attention"])
def test_stem_remat_takes_the_same_train_steps(argument):
    """Two steps from the same state and batches, with and without the remat: the same
    losses, parameters, batch-norm statistics and optimiser state."""
    runs = []
    for remat in (False, True):
        step, state = _step(argument, remat)
        losses = []
        for seed in range(2):
            state, metrics = step(state, _batch(seed), jnp.float32(0.1))
            losses.append(float(metrics["loss"]))
        runs.append((losses, state))
    (losses, state), (remat_losses, remat_state) = runs
    np.testing.assert_allclose(remat_losses, losses, rtol=1e-6)
    for field in ("params", "batch_stats", "opt_state"):
        chex.assert_trees_all_close(
            getattr(remat_state, field), getattr(state, field), rtol=1e-5, atol=1e-6
        )


def test_stem_remat_recomputes_the_attention_stem():
    """The compiled step of the full-attention model calls the stem's kernel's forward
    (``attention.native_stem``) once more with the remat: again in the backward pass."""

    def forward_calls(remat: bool) -> int:
        step, state = _step("variant=full_attention", remat)
        text = step.lower(state, _batch(0), jnp.float32(0.1)).compile().as_text()
        calls = [line for line in text.splitlines() if "custom-call" in line]
        return sum(STEM_FORWARD_TARGET in line for line in calls)

    plain = forward_calls(False)
    assert plain == 1
    assert forward_calls(True) == plain + 1
