"""What every task shares: the ``Task`` protocol the trainer drives, the compute dtype, and
how a batch's images become the model's input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax import data


class Task(Protocol):
    num_classes: int

    def create_model(self, seed: int) -> nnx.Module: ...

    def inputs(self, batch: dict) -> jax.Array: ...

    def loss(self, model, images: jax.Array, batch: dict) -> tuple[jax.Array, dict]: ...

    def eval_outputs(self, model, images: jax.Array, batch: dict) -> dict: ...

    def augment(self) -> data.pipeline.Augment: ...

    def eval_example(self) -> data.pipeline.EvalExample: ...

    def summarize(self, outputs: Iterable[dict]) -> dict[str, float]: ...

    def describe(self, results: dict[str, float]) -> str: ...


def compute_dtype(config) -> Any:
    """bfloat16 with ``config.half_precision``, else float32 (parameters stay float32)."""
    return jnp.bfloat16 if config.half_precision else jnp.float32


def normalized_images(config, batch: dict) -> jax.Array:
    """A batch's ``uint8`` images normalised on the device, in the config's compute dtype."""
    return data.normalize(batch["image"], dtype=compute_dtype(config))


__all__ = ["Task", "compute_dtype", "normalized_images"]
