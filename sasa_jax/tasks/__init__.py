"""What the shared trainer learns (layer 4): a task gives the model, its input, the loss, the
eval outputs and how they become metrics, and the examples the input pipeline makes.

``make_task(config, num_classes)`` picks ``ClassificationTask`` or, for a detection dataset,
``DetectionTask``; the trainer (``sasa_jax.train``) is the same for both.
"""

from __future__ import annotations

from sasa_jax import data
from sasa_jax.tasks.base import Task, check_pixel_normalisation, compute_dtype, normalized_images
from sasa_jax.tasks.classification import ClassificationTask, cross_entropy
from sasa_jax.tasks.detection import DetectionTask, check_detection_config, detector_spec


def make_task(config, num_classes: int) -> Task:
    """The task of ``config.dataset``'s kind (``data.dataset_task``)."""
    if data.dataset_task(config.dataset) == "detection":
        return DetectionTask(config, num_classes)
    return ClassificationTask(config, num_classes)


__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "Task",
    "check_detection_config",
    "check_pixel_normalisation",
    "compute_dtype",
    "cross_entropy",
    "detector_spec",
    "make_task",
    "normalized_images",
]
