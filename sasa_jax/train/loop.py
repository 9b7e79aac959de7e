"""The resumable training loop: ``train_and_evaluate(config, workdir)``.

Data parallelism is ``jax.jit`` over a ``Mesh`` with one ``data`` axis: the batch is sharded,
the state replicated and donated. Batch-norm statistics are taken over the global batch,
whatever the number of devices or processes. With ``config.deterministic_reductions`` (the
default) the step body runs under ``shard_map`` and every cross-device mean adds the devices'
values in device order (``sasa_jax.parallel``), so two processes of 2 devices compute the same
bits as one process of 4. Off, the sums are XLA's own all-reduces, whose rounding depends on the
layout. The state, optimiser and steps are ``train_steps``; what a workdir holds is ``workdir``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax import data, tasks
from sasa_jax.models import ModelSpec
from sasa_jax.nn.norm import set_batch_axis
from sasa_jax.train import host
from sasa_jax.train import workdir as run_record
from sasa_jax.train.checkpoints import Checkpointer
from sasa_jax.train.metrics import MetricWriter, Progress
from sasa_jax.train.steps import (
    create_optimizer,
    create_train_state,
    eval_step,
    learning_rate_schedule,
    train_step,
)


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


def check_config(config: ml_collections.ConfigDict) -> None:
    """The checks of ``validate_config`` that need no JAX backend (model, dataset, detection,
    schedule and logging fields): ``sasa_jax.sweep`` runs them for every cell before any run
    starts, without holding the accelerators its runs need."""
    ModelSpec.from_config(config.model)
    if data.dataset_task(config.dataset) == "detection":
        if "detection" not in config:
            raise ValueError(
                f"dataset {config.dataset!r} is for detection: derive the config from "
                "sasa_jax.train.config.detection_config() (see configs/digits_detection.py)"
            )
        tasks.check_detection_config(config)
    tasks.check_pixel_normalisation(config)
    if config.get("translate_pixels", 0) < 0:
        raise ValueError(f"config.translate_pixels must be >= 0, got {config.translate_pixels}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.num_train_steps > 0 or config.num_epochs > 0")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.log_every_steps < 1 or config.checkpoint_every_steps < 1:
        raise ValueError("config.log_every_steps and config.checkpoint_every_steps must be >= 1")
    accum = config.get("grad_accum_steps", 1)
    if accum < 1 or config.batch_size % accum:
        raise ValueError(
            f"config.grad_accum_steps ({accum}) must be >= 1 and divide config.batch_size "
            f"({config.batch_size})"
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises one clear ValueError for a config that cannot run, before anything compiles."""
    check_config(config)
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value < 1 or value % devices:
            raise ValueError(
                f"config.{name} ({value}) must be a positive multiple of the "
                f"number of devices ({devices})"
            )
        data.per_process_batch(value, jax.process_count(), f"config.{name}")
    accum = config.get("grad_accum_steps", 1)
    if (config.batch_size // devices) % accum:
        raise ValueError(
            f"config.grad_accum_steps ({accum}) must divide the per-device batch "
            f"({config.batch_size} // {devices} devices = {config.batch_size // devices})"
        )


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


# ------------------------------------------------------------------------- the loop


def _host(value) -> np.ndarray:
    """A replicated global array's value on this host."""
    return np.asarray(value.addressable_data(0))


class MetricWindow:
    """The train metrics of the steps since the last log line: their means are logged as
    ``train_loss`` and ``train_<name>`` for each scalar the task's loss reports (``top1`` for
    classification; ``class_loss``, ``box_loss``, ``positives`` for detection), with the last
    step's ``learning_rate``."""

    def __init__(self):
        self.metrics: list[dict] = []
        self.finite: list = []
        self.learning_rate = None

    def add(self, metrics: dict, learning_rate) -> None:
        self.metrics.append({k: v for k, v in metrics.items() if k != "finite"})
        self.finite.append(metrics["finite"])
        self.learning_rate = learning_rate

    def means(self) -> dict[str, float]:
        names = self.metrics[0].keys()
        means = {
            f"train_{name}": float(np.mean([float(_host(m[name])) for m in self.metrics]))
            for name in names
        }
        return {**means, "learning_rate": float(self.learning_rate)}


# Steps between the processes' agreements on stopping (multi-process runs).
AGREE_EVERY = 10


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

    def agreed(self, step: int) -> bool:
        """True when the run stops after ``step``. One process decides alone; several agree
        (stop together if any of them was signalled) every ``AGREE_EVERY`` steps, and only
        then: an all-gather at every step would cost every step a host round trip. A signal
        therefore stops the run within ``AGREE_EVERY`` steps, all processes at the same step."""
        if jax.process_count() == 1:
            return self.requested
        if step % AGREE_EVERY:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


def evaluate(state, splits, config, *, task, eval_fn, batch_sharding) -> dict[str, float]:
    """The task's metrics over the whole eval split, each example exactly once (top-1, top-5
    and loss for classification; COCO AP for detection)."""
    per_process = data.per_process_batch(config.eval_batch_size, jax.process_count())
    batches = data.eval_batches(
        splits.eval,
        batch_size=per_process,
        example=task.eval_example(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.num_threads,
    )
    outputs = (
        jax.tree.map(_host, eval_fn(state, data.to_global(batch, batch_sharding)))
        for batch in batches
    )
    return task.summarize(outputs)


def compiled_train_step(config, graphdef, tx, task, mesh, axis_name, batch_sharding):
    """``step(state, batch, learning_rate) -> (state, metrics)``, jitted over the mesh (per
    device under ``shard_map`` with ``axis_name``); the state is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        config=config,
        task=task,
        axis_name=axis_name,
    )
    if axis_name is not None:
        step = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(axis_name), PartitionSpec()),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,  # the outputs are replicated: every device adds in the same order
        )
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def compiled_eval_step(config, eval_graph, task, mesh, batch_sharding):
    """``eval(state, batch) -> the task's eval outputs``, jitted over the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(eval_step, graphdef=eval_graph, config=config, task=task),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint) and returns the last
    metrics written, with ``step`` and ``stopped`` (a signal stopped the run with a checkpoint
    before its last step). Raises FloatingPointError if the loss stops being finite."""
    validate_config(config)
    changes = run_record.resume_changes(config, workdir)
    primary = jax.process_index() == 0
    if primary:
        for line in changes:
            print(line, flush=True)
    splits = data.load_dataset_from_config(config)
    schedule = make_schedule(config, len(splits.train))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    task = tasks.make_task(config, splits.num_classes)
    model = task.create_model(config.seed)
    axis_name = "data" if config.deterministic_reductions else None
    set_batch_axis(model, axis_name)
    schedule_fn = learning_rate_schedule(config, schedule.total_steps, schedule.warmup_steps)
    learning_rates = np.asarray(schedule_fn(np.arange(schedule.total_steps)), np.float32)
    tx = create_optimizer(config)
    graphdef, eval_graph, state = create_train_state(model, tx, config)
    state = jax.device_put(state, replicated)
    step_fn = compiled_train_step(config, graphdef, tx, task, mesh, axis_name, batch_sharding)
    eval_fn = compiled_eval_step(config, eval_graph, task, mesh, batch_sharding)

    dataset = data.train_dataset(
        splits.train,
        batch_size=data.per_process_batch(config.batch_size, jax.process_count()),
        augment=task.augment(),
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
        run_record.save_config(config, workdir, num_classes=splits.num_classes)
        host.record_start(workdir, start)
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
    stop = False
    window = MetricWindow()
    timer, steps_timed, paused = time.perf_counter(), 0, 0.0
    try:
        with _Stopper() as stopper:
            for step in range(start + 1, schedule.total_steps + 1):
                rate = learning_rates[step - 1]
                state, metrics = step_fn(state, next(batches), rate)
                window.add(metrics, rate)
                steps_timed += 1
                final = step == schedule.total_steps
                stop = stopper.agreed(step)
                if step % schedule.log_every == 0 or final or stop:
                    _check_finite(window.finite, step, checkpointer)
                    elapsed = time.perf_counter() - timer - paused
                    rate = steps_timed / elapsed
                    last = {
                        **window.means(),
                        "steps_per_sec": rate,
                        "examples_per_sec": rate * schedule.global_batch,
                    }
                    writer.write(step, last)
                    progress.report(step, last["train_loss"], last["examples_per_sec"])
                    window = MetricWindow()
                    timer, steps_timed, paused = time.perf_counter(), 0, 0.0
                pause_start = time.perf_counter()
                if step % schedule.eval_every == 0 or final:
                    results = evaluate(
                        state,
                        splits,
                        config,
                        task=task,
                        eval_fn=eval_fn,
                        batch_sharding=batch_sharding,
                    )
                    writer.write(step, results)
                    last = {**last, **results}
                    if primary:
                        print(f"eval at step {step}: {task.describe(results)}", flush=True)
                if step % schedule.checkpoint_every == 0 or final or stop:
                    _check_finite(window.finite, step, checkpointer)
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
    return {"step": int(_host(state.step)), "stopped": stop, **last}


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
