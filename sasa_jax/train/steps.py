"""The train state, the optimiser a config asks for, and the train and eval steps.

Following the flax ImageNet example: ``create_train_state``, ``train_step``, ``eval_step``.
What is learned is a task's (``sasa_jax.tasks``): its model, its loss and its eval outputs;
the steps here are the same for every task. ``train_step`` runs on a global batch (sharded by
``jax.jit`` over a mesh) or, with ``axis_name``, per device inside ``shard_map``, where every
cross-device mean (gradients, loss metrics, batch-norm statistics) adds the devices' values in
device order (``sasa_jax.parallel``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sasa_jax import parallel
from sasa_jax.nn import set_batch_axis

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


def parameter_path(path: tuple) -> str:
    """``"stem/attention/emb_row"``: the dict keys of a pytree ``path`` of an ``nnx.State`` (or
    of a nested dict of arrays), joined by ``/``. The ``.value`` attribute an ``nnx.Variable``
    adds to every path is skipped."""
    return "/".join(str(e.key) for e in path if isinstance(e, jax.tree_util.DictKey))


def parameter_name(path: tuple) -> str:
    """The attribute name of the parameter at a pytree ``path``: the last dict key of
    ``parameter_path``, so ``(..., 'norm1', 'scale', .value)`` is ``"scale"``."""
    joined = parameter_path(path)
    if not joined:
        raise ValueError(f"no parameter name in the pytree path {jax.tree_util.keystr(path)}")
    return joined.rsplit("/", 1)[-1]


def decay_mask(params: nnx.State) -> Any:
    """True for weights that get weight decay, False for batch-norm scales and offsets and for
    every bias (``NO_DECAY``): a pytree of params' structure. Every other parameter is decayed:
    convolution and projection kernels, the relative tables, the stem's value mixture and its
    position and mixture embeddings (all of them multiply activations, as kernels do)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: parameter_name(path) not in NO_DECAY, params
    )


OPTIMIZERS = ("sgd", "adamw")


def learning_rate_scales(text: str) -> dict[str, float]:
    """``"stem:0.25,fpn:2"`` -> ``{"stem": 0.25, "fpn": 2.0}``: the learning-rate multiplier of
    the parameters under each path prefix (``config.learning_rate_scales``; "" for none)."""
    scales = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        prefix, sep, value = item.partition(":")
        prefix = prefix.strip().strip("/")
        try:
            scale = float(value) if sep and prefix else None
        except ValueError:
            scale = None
        if scale is None or not scale >= 0 or prefix in scales:
            raise ValueError(
                f"config.learning_rate_scales: {item!r} is not PREFIX:SCALE with a new path "
                "prefix and a scale >= 0, e.g. --config.learning_rate_scales=stem:0.25,fpn:2"
            )
        scales[prefix] = scale
    return scales


def _lies_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _scale_of(path: str, scales: dict[str, float]) -> float:
    matches = [prefix for prefix in scales if _lies_under(path, prefix)]
    if len(matches) > 1:
        raise ValueError(
            f"config.learning_rate_scales: the prefixes {matches} all match {path}; give each "
            "parameter at most one"
        )
    return scales[matches[0]] if matches else 1.0


def scale_by_prefix(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the update of every parameter whose path (``parameter_path``) is a prefix of
    ``scales`` or lies under one by that prefix's scale: a learning rate of its own, since the
    step multiplies the direction by the schedule's rate. ``init`` raises ``ValueError`` for a
    prefix that matches no parameter or two prefixes that match one, before anything
    compiles."""

    def init(params):
        paths = [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        for path in paths:
            _scale_of(path, scales)  # refuses overlapping prefixes here, not at compile time
        unmatched = [p for p in scales if not any(_lies_under(path, p) for path in paths)]
        if unmatched:
            tops = sorted({path.split("/")[0] for path in paths})
            raise ValueError(
                f"config.learning_rate_scales: no parameter lies under {unmatched}; the model's "
                f"top-level names are {tops}"
            )
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * jnp.asarray(_scale_of(parameter_path(path), scales), u.dtype),
            updates,
        ), state

    return optax.GradientTransformation(init, update)


def weight_decay(config) -> optax.GradientTransformation:
    """Adds ``config.weight_decay * p`` to the direction of every decayed weight
    (``decay_mask``). The rate lives in the optimiser state (``optax.inject_hyperparams``), so
    runs that differ only in their weight decay compile the same program, and their exempt
    parameters come out bit for bit the same."""
    add = optax.inject_hyperparams(optax.add_decayed_weights, static_args=("mask",))
    return add(weight_decay=config.weight_decay, mask=decay_mask)


def create_optimizer(config) -> optax.GradientTransformation:
    """The update direction; ``train_step`` scales it by the step's learning rate, which it
    takes as an argument, so the compiled step does not depend on the schedule.

    ``config.optimizer``: ``"sgd"`` (the paper's): L2 weight decay (not on batch-norm scales
    and offsets or biases), then (Nesterov) momentum -- ``optax.sgd`` after
    ``optax.add_decayed_weights``. ``"adamw"``: Adam's direction plus decoupled weight decay on
    the same weights (``optax.adamw``), for short runs from scratch.

    ``config.learning_rate_scales`` (``"stem:0.25"``; default none) then multiplies the whole
    direction of the parameters under each prefix, decay and momentum included, as a learning
    rate of their own would (``scale_by_prefix``).
    """
    kind = config.get("optimizer", "sgd")
    if kind == "adamw":
        parts = [optax.scale_by_adam(), weight_decay(config)]
    elif kind == "sgd":
        parts = [weight_decay(config), optax.trace(config.momentum, nesterov=config.nesterov)]
    else:
        raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    scales = learning_rate_scales(config.get("learning_rate_scales", ""))
    if scales:  # appended only when asked: other runs keep their optimiser state's structure
        parts.append(scale_by_prefix(scales))
    return optax.chain(*parts)


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


def abstract_train_state(task, tx: optax.GradientTransformation, config, axis_name=None):
    """``(graphdef, eval_graph, state)`` of ``task``'s model with the state as
    ShapeDtypeStructs: the model and its train state are built under ``jax.eval_shape``, so
    nothing is allocated (for compiling without devices); batch norms average over
    ``axis_name``."""
    graphs = {}

    def build():
        model = task.create_model(config.seed)
        set_batch_axis(model, axis_name)
        graphdef, eval_graph, state = create_train_state(model, tx, config)
        graphs["train"], graphs["eval"] = graphdef, eval_graph
        return state

    state = jax.eval_shape(build)
    return graphs["train"], graphs["eval"], state


def micro_batches(batch: dict, count: int) -> dict:
    """``[b, ...] -> [count, b / count, ...]`` for every array of ``batch``: micro-batch ``i``
    holds examples ``i, i + count, i + 2 count, ...``, so a batch sharded over devices gives
    every micro-batch an equal share of each device's examples (no data moves)."""

    def split(x):
        if x.shape[0] % count:
            raise ValueError(
                f"a batch of {x.shape[0]} does not split into {count} micro-batches "
                "(config.grad_accum_steps)"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _gradients(graphdef, params, batch_stats, batch, *, config, task):
    """The task's loss, its scalar metrics and the gradients on one (micro-)batch, and the
    batch statistics the forward pass leaves behind."""
    model = nnx.merge(graphdef, params, batch_stats)
    images = task.inputs(batch)

    def loss_fn(model):
        return task.loss(model, images, batch)

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return grads, {"loss": loss, **metrics}, nnx.state(model, nnx.BatchStat)


def accumulated_gradients(graphdef, params, batch_stats, batch, *, config, task):
    """``(grads, metrics, batch_stats)`` over ``config.grad_accum_steps`` micro-batches of
    ``batch``, one after another inside the compiled step (a ``lax.scan``): the gradients and
    metrics are the micro-batches' means, so without batch norm they equal one step on the
    whole batch. Each micro-batch is normalised by its own batch statistics (a batch of
    ``b / grad_accum_steps``), and the running statistics are updated once per micro-batch."""
    count = config.get("grad_accum_steps", 1)
    if count == 1:
        return _gradients(graphdef, params, batch_stats, batch, config=config, task=task)

    def one(carry, micro):
        # The parameters ride in the carry: NNX merges only variables of the scan's own trace.
        params, grad_sum, metric_sum, stats = carry
        grads, metrics, stats = _gradients(graphdef, params, stats, micro, config=config, task=task)
        sums = (jax.tree.map(jnp.add, grad_sum, grads), _add(metric_sum, metrics))
        return (params, *sums, stats), None

    shapes = jax.eval_shape(
        functools.partial(_gradients, config=config, task=task),
        graphdef,
        params,
        batch_stats,
        jax.tree.map(lambda x: x[0], micro_batches(batch, count)),
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])
    (_, grads, metrics, batch_stats), _ = jax.lax.scan(
        one, (params, *zeros, batch_stats), micro_batches(batch, count)
    )
    scale = 1.0 / count
    grads = jax.tree.map(lambda g: g * jnp.asarray(scale, g.dtype), grads)
    return grads, jax.tree.map(lambda m: m * scale, metrics), batch_stats


def _add(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key].astype(a[key].dtype) for key in a}


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
    """One optimiser step (``config.optimizer``) on a global batch at ``learning_rate`` (a
    float32 scalar) of ``task.loss``, over ``config.grad_accum_steps`` micro-batches; returns
    the new state and the loss's scalar metrics (with ``loss`` and ``finite``).

    With ``axis_name``, the step runs per device inside ``shard_map`` over that axis: ``batch``
    is the device's shard, and the gradients and metrics are averaged over the axis in
    device order (``parallel.ordered_mean``). ``graphdef``'s batch norms must then average over
    the same axis (``set_batch_axis``).
    """
    grads, metrics, batch_stats = accumulated_gradients(
        graphdef, state.params, state.batch_stats, batch, config=config, task=task
    )
    if axis_name is not None:
        grads, metrics = parallel.ordered_mean((grads, metrics), axis_name)
    new_state = apply_gradients(state, grads, batch_stats, learning_rate, tx=tx, config=config)
    return new_state, {**metrics, "finite": jnp.isfinite(metrics["loss"])}


def apply_gradients(
    state: TrainState, grads, batch_stats, learning_rate: jax.Array, *, tx, config
) -> TrainState:
    """The state after one optimiser step: ``p - learning_rate * direction`` with ``tx``'s
    direction for ``grads``, the EMA ``decay * ema + (1 - decay) * p`` of the new weights
    (when ``config.ema_decay > 0``), and the step's ``batch_stats``."""
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(
        lambda p, d: p - (learning_rate * d).astype(p.dtype), state.params, direction
    )
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(
            lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, ema, params
        )
    return state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema,
    )


def eval_step(state: TrainState, batch: dict, *, graphdef, config, task) -> dict:
    """``task.eval_outputs`` of the eval weights on a padded global batch."""
    model = nnx.merge(graphdef, state.eval_params(), state.batch_stats)
    return task.eval_outputs(model, task.inputs(batch), batch)
