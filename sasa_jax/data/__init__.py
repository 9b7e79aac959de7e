"""Input pipelines: TFDS ``data_source`` (array_record) feeding Grain; no TensorFlow.

``load_dataset`` opens a dataset by name (``digits``, ``digits_clutter``, ``imagenet2012``,
``image_folder``, and for detection ``digit_scenes``, ``coco``, ``coco_folder``);
``train_dataset`` and ``eval_batches`` turn its sources into batches of an augmentation's or
eval transform's examples (``TrainAugment`` / ``ClassificationEval``, ``DetectionAugment`` /
``DetectionEval``); ``augment_from_config`` reads the classification preprocessing settings
of a config.
"""

from sasa_jax.data.detection_preprocess import DetectionAugment, DetectionEval
from sasa_jax.data.pipeline import (
    TrainIterator,
    eval_batches,
    eval_steps,
    per_process_batch,
    prefetch_to_mesh,
    shard,
    to_global,
    train_dataset,
)
from sasa_jax.data.preprocess import (
    ClassificationEval,
    TrainAugment,
    eval_image,
    normalize,
    train_image,
)
from sasa_jax.data.sources import (
    DATASETS,
    DETECTION_DATASETS,
    REGISTRY,
    Dataset,
    DatasetSplits,
    dataset_info,
    dataset_task,
    load_dataset,
)


def augment_from_config(config) -> TrainAugment:
    """The training augmentation a config asks for."""
    return TrainAugment(
        size=config.image_size,
        area_range=(config.crop_area_min, 1.0),
        ratio_range=(config.crop_ratio_min, config.crop_ratio_max),
        flip=config.random_flip,
        translate=config.get("translate_pixels", 0),
    )


def load_dataset_from_config(config) -> DatasetSplits:
    """``load_dataset`` with a config's dataset fields."""
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir or None,
        image_folder=config.image_folder,
        coco_folder=config.get("coco_folder", ""),
        eval_split=config.eval_split,
        minival_percent=config.minival_percent,
    )


__all__ = [
    "DATASETS",
    "DETECTION_DATASETS",
    "REGISTRY",
    "Dataset",
    "dataset_info",
    "dataset_task",
    "ClassificationEval",
    "DatasetSplits",
    "DetectionAugment",
    "DetectionEval",
    "TrainAugment",
    "TrainIterator",
    "augment_from_config",
    "eval_batches",
    "eval_image",
    "eval_steps",
    "load_dataset",
    "load_dataset_from_config",
    "normalize",
    "per_process_batch",
    "prefetch_to_mesh",
    "shard",
    "to_global",
    "train_dataset",
    "train_image",
]
