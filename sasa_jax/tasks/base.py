"""What every task shares: the ``Task`` protocol the trainer drives, the compute dtype, and
how a batch's images become the model's input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax import data
from sasa_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


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
    """A batch's ``uint8`` images normalised on the device with the config's ``pixel_mean`` and
    ``pixel_std`` (ImageNet's for a run recorded without them), in its compute dtype."""
    mean, std = _pixel_normalisation(config)
    return data.normalize(batch["image"], mean=mean, std=std, dtype=compute_dtype(config))


def _pixel_normalisation(config) -> tuple[tuple, tuple]:
    return (
        tuple(config.get("pixel_mean", IMAGENET_MEAN)),
        tuple(config.get("pixel_std", IMAGENET_STD)),
    )


def check_pixel_normalisation(config) -> None:
    """Raises ValueError unless ``pixel_mean`` and ``pixel_std`` have three values (R, G, B)
    and every std is positive."""
    mean, std = _pixel_normalisation(config)
    for name, values in (("pixel_mean", mean), ("pixel_std", std)):
        if len(values) != 3:
            raise ValueError(f"config.{name} needs 3 values (R, G, B), got {values}")
    if min(std) <= 0:
        raise ValueError(f"config.pixel_std must be positive, got {std}")


__all__ = ["Task", "check_pixel_normalisation", "compute_dtype", "normalized_images"]
