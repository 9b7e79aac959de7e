"""The trainer's own train and eval steps, compiled for a target without its devices.

``compile_steps(config, devices, per_device_batch)`` builds the config's task and train state
abstractly (nothing is allocated), makes the train step exactly as ``train_lib`` does (the same
``shard_map`` or plain ``jax.jit`` over a ``data`` mesh, the same donation) over the target's
compile-only devices (``targets``), lowers it with batch-sharded inputs and compiles it with
XLA for that target (Mosaic and XLA:TPU, or Triton and XLA:GPU). Each ``StepReport`` gives
XLA's per-device memory and, where the backend reports them, FLOPs and bytes accessed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax import tasks
from sasa_jax.train import loop as train_lib
from sasa_jax.train.steps import abstract_train_state, create_optimizer

GB = 1e9


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compiled step's per-device memory (bytes) and cost."""

    step: str
    arguments: int
    outputs: int
    aliased: int
    temp: int
    code: int
    compile_seconds: float
    flops: float | None
    bytes_accessed: float | None
    kernels: int = 0

    @property
    def peak(self) -> int:
        """Arguments, outputs not aliased to them (the donated state), temporaries and code:
        what the step holds at once on each device."""
        return self.arguments + self.outputs - self.aliased + self.temp + self.code

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "memory": {
                "arguments_bytes": self.arguments,
                "outputs_bytes": self.outputs,
                "aliased_bytes": self.aliased,
                "temp_bytes": self.temp,
                "code_bytes": self.code,
                "peak_bytes": self.peak,
            },
            "compile_seconds": round(self.compile_seconds, 1),
            "flops": self.flops,
            "bytes_accessed": self.bytes_accessed,
            "kernels": self.kernels,
        }


# How each platform's Pallas kernels appear in a compiled program.
KERNEL_MARKERS = ("tpu_custom_call", "__gpu$xla.gpu.triton")


def _report(step: str, lowered, start: float) -> StepReport:
    compiled = lowered.compile()
    text = compiled.as_text()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    cost = cost or {}
    return StepReport(
        step=step,
        arguments=int(memory.argument_size_in_bytes),
        outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes),
        temp=int(memory.temp_size_in_bytes),
        code=int(memory.generated_code_size_in_bytes),
        compile_seconds=seconds,
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        kernels=sum(text.count(marker) for marker in KERNEL_MARKERS),
    )


def _abstract(example: dict[str, np.ndarray], batch: int, sharding) -> dict:
    """A batch of ``batch`` examples like ``example``, as sharded ShapeDtypeStructs."""
    return {
        name: _struct((batch, *np.shape(value)), np.asarray(value).dtype, sharding)
        for name, value in example.items()
    }


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def with_batch(config: ml_collections.ConfigDict, per_device_batch: int, count: int):
    """A copy of ``config`` whose train and eval batches are ``per_device_batch`` on each of
    ``count`` devices."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = config.eval_batch_size = per_device_batch * count
    return config


def compile_steps(
    config: ml_collections.ConfigDict,
    devices: list,
    per_device_batch: int,
    *,
    steps: tuple[str, ...] = ("train", "eval"),
) -> list[StepReport]:
    """Compiles the config's train and/or eval step for ``devices`` (compile-only devices of a
    target, ``targets.devices``) at ``per_device_batch`` images per device; returns one report
    per step. ValueError for a config that cannot run."""
    if per_device_batch < 1:
        raise ValueError(f"--per_device_batch must be at least 1, got {per_device_batch}")
    config = with_batch(config, per_device_batch, len(devices))
    train_lib.check_config(config)
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    task = tasks.make_task(config, config.model.num_classes)
    axis_name = "data" if config.deterministic_reductions else None
    tx = create_optimizer(config)
    graphdef, eval_graph, state = abstract_train_state(task, tx, config, axis_name)
    state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state
    )
    reports = []
    if "train" in steps:
        step = train_lib.compiled_train_step(
            config, graphdef, tx, task, mesh, axis_name, batch_sharding
        )
        batch = _abstract(task.augment().empty(), config.batch_size, batch_sharding)
        rate = _struct((), jnp.float32, replicated)
        start = time.perf_counter()
        reports.append(_report("train", step.lower(state, batch, rate), start))
    if "eval" in steps:
        fn = train_lib.compiled_eval_step(config, eval_graph, task, mesh, batch_sharding)
        batch = _abstract(task.eval_example().empty(), config.eval_batch_size, batch_sharding)
        start = time.perf_counter()
        reports.append(_report("eval", fn.lower(state, batch), start))
    return reports


__all__ = ["GB", "StepReport", "compile_steps", "with_batch"]
