"""The train state, the optimiser a config asks for, and the train and eval steps.

Following the flax ImageNet example: ``create_train_state``, ``train_step``, ``eval_step``.
What is learned is a task's (``sasa_jax.tasks``): its model, its loss and its eval outputs;
the steps here are the same for every task. ``train_step`` runs on a global batch (sharded by
``jax.jit`` over a mesh) or, with ``axis_name``, per device inside ``shard_map``, where every
cross-device mean (gradients, loss metrics, batch-norm statistics) adds the devices' values in
device order (``sasa_jax.parallel``).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sasa_jax import data, parallel

NO_DECAY = ("bias", "scale")  # batch-norm scales and offsets, and every bias


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None

    def eval_params(self) -> nnx.State:
        """The weights eval uses: the EMA when the run keeps one."""
        return self.params if self.ema_params is None else self.ema_params


def compute_dtype(config) -> Any:
    """bfloat16 with ``config.half_precision``, else float32 (parameters stay float32)."""
    return jnp.bfloat16 if config.half_precision else jnp.float32


def learning_rate_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``base * batch / 256``, then cosine decay to 0."""
    peak = config.base_learning_rate * config.batch_size / 256.0
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def decay_mask(params: nnx.State) -> Any:
    """True for weights that get weight decay: all but batch-norm scales/offsets and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY, params
    )


OPTIMIZERS = ("sgd", "adamw")


def create_optimizer(config) -> optax.GradientTransformation:
    """The update direction; ``train_step`` scales it by the step's learning rate, which it
    takes as an argument, so the compiled step does not depend on the schedule.

    ``config.optimizer``: ``"sgd"`` (the paper's): L2 weight decay (not on batch-norm scales
    and offsets or biases), then (Nesterov) momentum -- ``optax.sgd`` with the schedule.
    ``"adamw"``: Adam's direction plus decoupled weight decay on the same weights
    (``optax.adamw``), for short runs from scratch.
    """
    kind = config.get("optimizer", "sgd")
    if kind == "adamw":
        return optax.chain(
            optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay, mask=decay_mask)
        )
    if kind != "sgd":
        raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.trace(decay=config.momentum, nesterov=config.nesterov),
    )


def create_train_state(model, tx: optax.GradientTransformation, config):
    """Splits a model into graph definitions (train and eval mode) and a ``TrainState``."""
    model.eval()
    eval_graph = nnx.graphdef(model)
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds state other than parameters and batch statistics")
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None,
    )
    return graphdef, eval_graph, state


def train_step(
    state: TrainState,
    batch: dict,
    learning_rate: jax.Array,
    *,
    graphdef,
    tx,
    config,
    task,
    axis_name: str | None = None,
):
    """One SGD step on a global batch at ``learning_rate`` (a float32 scalar) of
    ``task.loss``; returns the new state and the loss's scalar metrics (with ``loss`` and
    ``finite``).

    With ``axis_name``, the step runs per device inside ``shard_map`` over that axis: ``batch``
    is the device's shard, and the gradients and metrics are averaged over the axis in
    device order (``parallel.ordered_mean``). ``graphdef``'s batch norms must then average over
    the same axis (``set_batch_axis``).
    """
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    images = data.normalize(batch["image"], dtype=compute_dtype(config))

    def loss_fn(model):
        return task.loss(model, images, batch)

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    metrics = {"loss": loss, **metrics}
    if axis_name is not None:
        grads, metrics = parallel.ordered_mean((grads, metrics), axis_name)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(
        lambda p, d: p - (learning_rate * d).astype(p.dtype), state.params, direction
    )
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(
            lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, ema, params
        )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=nnx.state(model, nnx.BatchStat),
        opt_state=opt_state,
        ema_params=ema,
    )
    return new_state, {**metrics, "finite": jnp.isfinite(metrics["loss"])}


def eval_step(state: TrainState, batch: dict, *, graphdef, config, task) -> dict:
    """``task.eval_outputs`` of the eval weights on a padded global batch."""
    model = nnx.merge(graphdef, state.eval_params(), state.batch_stats)
    images = data.normalize(batch["image"], dtype=compute_dtype(config))
    return task.eval_outputs(model, images, batch)
