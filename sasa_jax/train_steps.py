"""The train state, the model and optimiser a config asks for, and the train and eval steps.

Following the flax ImageNet example: ``create_train_state``, ``train_step``, ``eval_step``.
``train_step`` runs on a global batch (sharded by ``jax.jit`` over a mesh) or, with
``axis_name``, per device inside ``shard_map``, where every cross-device mean (gradients, loss,
batch-norm statistics) adds the devices' values in device order (``sasa_jax.parallel``).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sasa_jax import data, parallel
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.norm import BatchNorm

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


def create_model(config, num_classes: int, *, seed: int = 0):
    """The config's model, with batch norms whose cross-device statistics add in device
    order (``sasa_jax.norm``; per-device statistics until ``set_batch_axis``)."""
    spec = ModelSpec.from_config(config.model, num_classes=num_classes)
    dtype = compute_dtype(config)
    return build_model(spec, rngs=nnx.Rngs(seed), dtype=dtype, batch_norm=BatchNorm)


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


def create_optimizer(config) -> optax.GradientTransformation:
    """SGD's direction: L2 weight decay (not on batch-norm scales and offsets or biases), then
    (Nesterov) momentum. ``train_step`` scales it by the step's learning rate, which it takes
    as an argument -- ``optax.sgd`` with the schedule, with the schedule computed on the host,
    so the compiled step does not depend on the schedule's length or peak."""
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


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float
) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing, ``[batch]``."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(
    state: TrainState,
    batch: dict,
    learning_rate: jax.Array,
    *,
    graphdef,
    tx,
    config,
    num_classes: int,
    axis_name: str | None = None,
):
    """One SGD step on a global batch at ``learning_rate`` (a float32 scalar); returns the new
    state and scalar metrics.

    With ``axis_name``, the step runs per device inside ``shard_map`` over that axis: ``batch``
    is the device's shard, and the gradients, loss and accuracy are averaged over the axis in
    device order (``parallel.ordered_mean``). ``graphdef``'s batch norms must then average over
    the same axis (``set_batch_axis``).
    """
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    images = data.normalize(batch["image"], dtype=compute_dtype(config))

    def loss_fn(model):
        logits = model(images)
        loss = cross_entropy(logits, batch["label"], num_classes, config.label_smoothing)
        return loss.mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, loss, accuracy = parallel.ordered_mean((grads, loss, accuracy), axis_name)
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
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "finite": jnp.isfinite(loss),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, graphdef, config, num_classes: int) -> dict:
    """Sums over the real (masked) examples of a padded global batch."""
    model = nnx.merge(graphdef, state.eval_params(), state.batch_stats)
    logits = model(data.normalize(batch["image"], dtype=compute_dtype(config)))
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return {
        "count": mask.sum(),
        "loss": (loss * mask).sum(),
        "top1": ((top5[:, 0] == batch["label"]) * mask).sum(),
        "top5": ((top5 == batch["label"][:, None]).any(-1) * mask).sum(),
    }
