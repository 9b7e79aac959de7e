"""Training and evaluation: state, optimiser, steps over a device mesh, the resumable loop.

Following the flax ImageNet example: ``create_train_state``, ``train_step``, ``eval_step``,
``train_and_evaluate(config, workdir)``. Data parallelism is ``jax.jit`` over a ``Mesh`` with
one ``data`` axis: the batch is sharded, the state replicated and donated. Batch-norm statistics
are taken over the global batch, whatever the number of devices or processes.

With ``config.deterministic_reductions`` (the default) the step body runs under ``shard_map``
and every cross-device mean (gradients, loss, batch-norm statistics) adds the devices' values in
device order (``sasa_jax.parallel``), so two processes of 2 devices compute the same bits as one
process of 4. Off, the sums are XLA's own all-reduces, whose rounding depends on the layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax import data, parallel
from sasa_jax.checkpoints import Checkpointer
from sasa_jax.metrics import MetricWriter, Progress
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.norm import set_batch_axis

NO_DECAY = ("bias", "scale")  # batch-norm scales and offsets, and every bias


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None
    rng: jax.Array

    def eval_params(self) -> nnx.State:
        """The weights eval uses: the EMA when the run keeps one."""
        return self.params if self.ema_params is None else self.ema_params


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts derived from a config and a dataset size."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    log_every: int
    checkpoint_every: int


# ----------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises one clear ValueError for a config that cannot run, before anything compiles."""
    spec = ModelSpec.from_config(config.model)
    spec.validate()
    if config.dataset not in data.DATASETS:
        raise ValueError(f"config.dataset must be one of {data.DATASETS}, got {config.dataset!r}")
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value < 1 or value % devices:
            raise ValueError(
                f"config.{name} ({value}) must be a positive multiple of the "
                f"number of devices ({devices})"
            )
        data.per_process_batch(value, jax.process_count(), f"config.{name}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.num_train_steps > 0 or config.num_epochs > 0")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.log_every_steps < 1 or config.checkpoint_every_steps < 1:
        raise ValueError("config.log_every_steps and config.checkpoint_every_steps must be >= 1")


def make_schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> Schedule:
    steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) is larger than the training "
            f"set ({num_train_examples} examples)"
        )
    total = (
        config.num_train_steps
        if config.num_train_steps > 0
        else int(config.num_epochs * steps_per_epoch)
    )
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    return Schedule(
        global_batch=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        eval_every=eval_every,
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
    )


# -------------------------------------------------------------- model, optimiser, state


def compute_dtype(config) -> Any:
    return jnp.bfloat16 if config.half_precision else jnp.float32


def create_model(config, num_classes: int, *, seed: int = 0):
    spec = ModelSpec.from_config(config.model, num_classes=num_classes)
    return build_model(spec, rngs=nnx.Rngs(seed), dtype=compute_dtype(config))


def learning_rate_schedule(config, schedule: Schedule) -> optax.Schedule:
    """Linear warm-up from 0 to ``base * batch / 256``, then cosine decay to 0."""
    peak = config.base_learning_rate * config.batch_size / 256.0
    warmup = min(schedule.warmup_steps, max(schedule.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(schedule.total_steps, warmup + 1),
        end_value=0.0,
    )


def decay_mask(params: nnx.State) -> Any:
    """True for weights that get weight decay: all but batch-norm scales/offsets and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY, params
    )


def create_optimizer(config, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled-from-BN L2 weight decay."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
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
        rng=jax.random.PRNGKey(config.seed),
    )
    return graphdef, eval_graph, state


# ------------------------------------------------------------------------------ steps


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float
) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing, ``[batch]``."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef,
    tx,
    learning_rate,
    config,
    num_classes: int,
    axis_name: str | None = None,
):
    """One SGD step on a global batch; returns the new state and scalar metrics.

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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
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
        rng=jax.random.fold_in(state.rng, state.step),
    )
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "learning_rate": learning_rate(state.step),
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


# ------------------------------------------------------------------------- the loop


def _host(value) -> np.ndarray:
    """A replicated global array's value on this host."""
    return np.asarray(value.addressable_data(0))


class _Stopper:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """All processes stop together if any of them was signalled."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


def evaluate(state, splits, config, *, eval_fn, batch_sharding) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole eval split, each example exactly once."""
    per_process = data.per_process_batch(config.eval_batch_size, jax.process_count())
    totals = None
    for batch in data.eval_batches(
        splits.eval,
        batch_size=per_process,
        image_size=config.image_size,
        crop_fraction=config.eval_crop_fraction,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.num_threads,
    ):
        sums = eval_fn(state, data.to_global(batch, batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(_host(v)) for k, v in totals.items()}
    count = totals["count"]
    return {
        "eval_top1": totals["top1"] / count,
        "eval_top5": totals["top5"] / count,
        "eval_loss": totals["loss"] / count,
        "eval_examples": int(count),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint) and returns the last
    metrics written. Raises FloatingPointError if the loss stops being finite."""
    validate_config(config)
    primary = jax.process_index() == 0
    splits = data.load_dataset_from_config(config)
    schedule = make_schedule(config, len(splits.train))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    model = create_model(config, splits.num_classes, seed=config.seed)
    axis_name = "data" if config.deterministic_reductions else None
    set_batch_axis(model, axis_name)
    learning_rate = learning_rate_schedule(config, schedule)
    tx = create_optimizer(config, learning_rate)
    graphdef, eval_graph, state = create_train_state(model, tx, config)
    state = jax.device_put(state, replicated)
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        learning_rate=learning_rate,
        config=config,
        num_classes=splits.num_classes,
        axis_name=axis_name,
    )
    if axis_name is not None:
        step = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(axis_name)),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,  # the outputs are replicated: every device adds in the same order
        )
    step_fn = jax.jit(
        step,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(
            eval_step, graphdef=eval_graph, config=config, num_classes=splits.num_classes
        ),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    dataset = data.train_dataset(
        splits.train,
        batch_size=data.per_process_batch(config.batch_size, jax.process_count()),
        augment=data.augment_from_config(config),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.num_workers,
        num_threads=config.num_threads,
    )
    batches = data.prefetch_to_mesh(
        data.TrainIterator(dataset), batch_sharding, size=config.prefetch_batches
    )
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    state, start = checkpointer.restore_latest(state, batches)
    if primary:
        save_run_config(config, workdir, num_classes=splits.num_classes)
    writer = MetricWriter(workdir, enabled=primary)
    progress = Progress(schedule.total_steps, start, enabled=primary)
    if primary:
        print(
            f"{config.dataset}: training steps {start + 1}..{schedule.total_steps} "
            f"({schedule.steps_per_epoch} per epoch, global batch {schedule.global_batch}, "
            f"{jax.device_count()} devices in {jax.process_count()} processes)",
            flush=True,
        )
    last: dict[str, Any] = {}
    window = {"loss": [], "finite": [], "learning_rate": None}
    timer, steps_timed, paused = time.perf_counter(), 0, 0.0
    try:
        with _Stopper() as stopper:
            for step in range(start + 1, schedule.total_steps + 1):
                state, metrics = step_fn(state, next(batches))
                window["loss"].append(metrics["loss"])
                window["finite"].append(metrics["finite"])
                window["learning_rate"] = metrics["learning_rate"]
                steps_timed += 1
                final = step == schedule.total_steps
                stop = stopper.agreed()
                if step % schedule.log_every == 0 or final or stop:
                    _check_finite(window["finite"], step, checkpointer)
                    elapsed = time.perf_counter() - timer - paused
                    losses = [float(_host(x)) for x in window["loss"]]
                    rate = steps_timed / elapsed
                    last = {
                        "train_loss": float(np.mean(losses)),
                        "learning_rate": float(_host(window["learning_rate"])),
                        "steps_per_sec": rate,
                        "examples_per_sec": rate * schedule.global_batch,
                    }
                    writer.write(step, last)
                    progress.report(step, last["train_loss"], last["examples_per_sec"])
                    window = {"loss": [], "finite": [], "learning_rate": None}
                    timer, steps_timed, paused = time.perf_counter(), 0, 0.0
                pause_start = time.perf_counter()
                if step % schedule.eval_every == 0 or final:
                    results = evaluate(
                        state, splits, config, eval_fn=eval_fn, batch_sharding=batch_sharding
                    )
                    writer.write(step, results)
                    last = {**last, **results}
                    if primary:
                        print(
                            f"eval at step {step}: top-1 {results['eval_top1']:.4f}, "
                            f"top-5 {results['eval_top5']:.4f}, loss "
                            f"{results['eval_loss']:.4f}",
                            flush=True,
                        )
                if step % schedule.checkpoint_every == 0 or final or stop:
                    _check_finite(window["finite"], step, checkpointer)
                    checkpointer.save(step, state, batches)
                paused += time.perf_counter() - pause_start
                if stop:
                    if primary:
                        print(
                            f"stopped at step {step} with a checkpoint; run the same command "
                            "to resume",
                            flush=True,
                        )
                    break
    finally:
        checkpointer.close()
        writer.close()
    return {"step": int(_host(state.step)), **last}


def save_run_config(config, workdir: str, *, num_classes: int) -> None:
    """Writes ``workdir/config.json``: the run's config with the dataset's class count, so a
    run can be rebuilt later (``sasa_jax.visualize``)."""
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.model.num_classes = num_classes
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(resolved.to_json(indent=2))


def load_run(workdir: str):
    """``(config, model in eval mode with the latest checkpoint's weights, step)`` of a run
    made by ``train.py``; the EMA weights when the run kept them, as eval does.

    Raises FileNotFoundError if ``workdir`` holds no run or no checkpoint yet.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} holds no run of train.py (no config.json)")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        model = create_model(config, config.model.num_classes, seed=config.seed)
        tx = create_optimizer(config, optax.constant_schedule(0.0))
        graphdef, eval_graph, state = create_train_state(model, tx, config)
        state = checkpointer.restore_state(step, state)
    finally:
        checkpointer.close()
    return config, nnx.merge(eval_graph, state.eval_params(), state.batch_stats), step


def _check_finite(flags: list, step: int, checkpointer: Checkpointer) -> None:
    if flags and not all(bool(_host(f)) for f in flags):
        latest = checkpointer.latest_step()
        kept = (
            f"the last good checkpoint (step {latest}) is kept"
            if latest
            else "no checkpoint had been saved yet"
        )
        raise FloatingPointError(
            f"the training loss became NaN or Inf by step {step}; {kept}. Lower "
            "config.base_learning_rate or check the data."
        )
