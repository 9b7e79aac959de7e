"""Image classification with a ResNet: label-smoothed cross-entropy; eval top-1 and top-5."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sasa_jax import data
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.nn import BatchNorm
from sasa_jax.tasks.base import compute_dtype, normalized_images


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float
) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing, ``[batch]``."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Image classification with a ResNet: label-smoothed cross-entropy; eval top-1/top-5."""

    config: Any
    num_classes: int

    def create_model(self, seed: int) -> nnx.Module:
        """The config's ResNet, with batch norms whose cross-device statistics add in device
        order (``sasa_jax.norm``; per-device statistics until ``set_batch_axis``)."""
        spec = ModelSpec.from_config(self.config.model, num_classes=self.num_classes)
        dtype = compute_dtype(self.config)
        return build_model(spec, rngs=nnx.Rngs(seed), dtype=dtype, batch_norm=BatchNorm)

    def inputs(self, batch: dict) -> jax.Array:
        """The batch's images, normalised, in the compute dtype: the model's input."""
        return normalized_images(self.config, batch)

    def loss(self, model, images, batch):
        logits = model(images)
        smoothing = self.config.label_smoothing
        loss = cross_entropy(logits, batch["label"], self.num_classes, smoothing).mean()
        return loss, {"top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    def eval_outputs(self, model, images, batch) -> dict:
        """Sums over the real (masked) examples of a padded global batch."""
        logits = model(images)
        mask = batch["mask"].astype(jnp.float32)
        loss = cross_entropy(logits, batch["label"], self.num_classes, 0.0)
        top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
        return {
            "count": mask.sum(),
            "loss": (loss * mask).sum(),
            "top1": ((top5[:, 0] == batch["label"]) * mask).sum(),
            "top5": ((top5 == batch["label"][:, None]).any(-1) * mask).sum(),
        }

    def augment(self) -> data.TrainAugment:
        return data.augment_from_config(self.config)

    def eval_example(self) -> data.ClassificationEval:
        return data.ClassificationEval(self.config.image_size, self.config.eval_crop_fraction)

    def summarize(self, outputs: Iterable[dict]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for sums in outputs:
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(np.asarray(value, np.float64))
        count = totals["count"]
        return {
            "eval_top1": totals["top1"] / count,
            "eval_top5": totals["top5"] / count,
            "eval_loss": totals["loss"] / count,
            "eval_examples": int(count),
        }

    def describe(self, results: dict[str, float]) -> str:
        return (
            f"top-1 {results['eval_top1']:.4f}, top-5 {results['eval_top5']:.4f}, "
            f"loss {results['eval_loss']:.4f}"
        )
