"""Random-access sources (TFDS ``data_source``, array_record) for each dataset by name.

One registry (``REGISTRY``: name, task, eval split, how its sources open) describes every
dataset. Classification records are dicts with ``image`` (encoded bytes: images are not decoded
here) and ``label``; detection records have ``image`` and ``objects`` (``detection_builders``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds

from sasa_jax.data.builders import SasaDigits, SasaDigitsClutter, SasaImageFolder
from sasa_jax.data.detection_builders import SasaCocoFolder, SasaDigitScenes
from sasa_jax.data.errors import listing_error

SKIP_DECODING = {"image": tfds.decode.SkipDecoding()}

IMAGENET_HELP = """ImageNet 2012 is not prepared in array_record format under {data_dir}.
Prepare it once (this step needs TensorFlow: pip install -e ".[imagenet]"):
  1. Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in
     {data_dir}/downloads/manual/
  2. Run:  tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record
Training reads it without TensorFlow. Set --config.data_dir (or TFDS_DATA_DIR) to point
elsewhere."""

COCO_HELP = """COCO 2017 is not prepared in array_record format under {data_dir}.
Prepare it once (this step needs TensorFlow and downloads about 25 GB):
  pip install -e ".[coco]"
  tfds build coco/2017 --data_dir={data_dir} --file_format=array_record
Training reads it without TensorFlow. Set --config.data_dir (or TFDS_DATA_DIR) to point
elsewhere; for your own COCO-format folder use configs/coco_folder.py:DIR."""


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The train and eval sources of a dataset; each is a sequence of records."""

    name: str
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    num_classes: int
    train_split: str
    eval_split: str
    class_names: tuple[str, ...] = ()


def split_names(dataset: str, eval_split: str, minival_percent: int) -> tuple[str, str]:
    """TFDS split strings for training and evaluation.

    ``eval_split="minival"`` holds out the first ``minival_percent`` % of train (the paper
    held out 4%) and trains on the rest.
    """
    default = dataset_info(dataset).eval_split
    eval_split = eval_split or default
    if eval_split == "minival":
        if not 0 < minival_percent < 100:
            raise ValueError(f"minival_percent must be in (0, 100), got {minival_percent}")
        return f"train[{minival_percent}%:]", f"train[:{minival_percent}%]"
    if eval_split != default:
        raise ValueError(
            f"eval_split for {dataset} must be {default!r} or 'minival', got {eval_split!r}"
        )
    return "train", eval_split


def _unreadable_error(unreadable: list) -> ValueError:
    problems = [f"{path}: {reason}" for path, reason in unreadable]
    return listing_error(f"{len(unreadable)} image file(s) cannot be used", problems)


def _prepared_builder(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Builds the dataset once; a build that skipped unreadable files is discarded and one
    ValueError lists them all."""
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare(file_format="array_record")
        unreadable = getattr(builder, "unreadable", [])
        if unreadable:
            shutil.rmtree(builder.data_dir, ignore_errors=True)
            raise _unreadable_error(unreadable)
    return builder


def _imagenet_sources(data_dir: str | None, splits: tuple[str, str]):
    shown_dir = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    try:
        return tfds.data_source(
            "imagenet2012",
            split=list(splits),
            data_dir=data_dir,
            download=False,
            decoders=SKIP_DECODING,
        )
    except (NotImplementedError, AssertionError, FileNotFoundError) as error:
        raise FileNotFoundError(IMAGENET_HELP.format(data_dir=shown_dir)) from error


def _class_names(info: tfds.core.DatasetInfo) -> tuple[str, ...]:
    """The class names of a dataset's ``label`` (or ``objects/label``) feature."""
    features = info.features
    label = features["objects"]["label"] if "objects" in features else features["label"]
    return tuple(label.names)


def _coco_sources(data_dir: str | None, splits: tuple[str, str]):
    """COCO 2017 prepared by ``tfds build``, read through its files (TFDS's own COCO builder
    needs TensorFlow even to be constructed): ``((train, eval), class names)``."""
    root = pathlib.Path(data_dir or os.path.expanduser("~/tensorflow_datasets")) / "coco" / "2017"
    versions = sorted(root.glob("*/dataset_info.json"))
    help = COCO_HELP.format(data_dir=data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)")
    if not versions:
        raise FileNotFoundError(help)
    builder = tfds.builder_from_directory(str(versions[-1].parent))
    try:
        sources = builder.as_data_source(split=list(splits), decoders=SKIP_DECODING)
    except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(help) from error
    return sources, _class_names(builder.info)


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """What opening a dataset's sources takes besides its name."""

    data_dir: str | None
    splits: tuple[str, str]
    image_folder: str = ""
    coco_folder: str = ""


Opener = Callable[[SourceOptions], tuple[tuple[Sequence, Sequence], tuple[str, ...]]]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One entry of the registry: a dataset's name, its task ("classification" or
    "detection"), its own eval split, and how its ``(train, eval)`` sources and class names
    are opened (``open(SourceOptions)``)."""

    name: str
    task: str
    eval_split: str
    open: Opener


def _built(make_builder: Callable[[SourceOptions], tfds.core.DatasetBuilder]) -> Opener:
    """Sources of a dataset built offline on first use by ``make_builder``'s builder."""

    def open_sources(options: SourceOptions):
        builder = _prepared_builder(make_builder(options))
        sources = builder.as_data_source(split=list(options.splits), decoders=SKIP_DECODING)
        return sources, _class_names(builder.info)

    return open_sources


def _kwargs(options: SourceOptions) -> dict:
    return dict(data_dir=options.data_dir, file_format="array_record")


def _image_folder(options: SourceOptions) -> tfds.core.DatasetBuilder:
    if not options.image_folder:
        raise ValueError(
            "dataset 'image_folder' needs config.image_folder, e.g. "
            "--config=configs/image_folder.py:/path/to/images"
        )
    return SasaImageFolder(folder=options.image_folder, **_kwargs(options))


def _coco_folder(options: SourceOptions) -> tfds.core.DatasetBuilder:
    if not options.coco_folder:
        raise ValueError(
            "dataset 'coco_folder' needs config.coco_folder, e.g. "
            "--config=configs/coco_folder.py:/path/to/folder"
        )
    builder = SasaCocoFolder(folder=options.coco_folder, **_kwargs(options))
    if "validation" in options.splits[1] and not builder.has_val:
        raise FileNotFoundError(
            f"{options.coco_folder} has no annotations/instances_val.json; add a val split, or "
            "hold out part of train with --config.eval_split=minival"
        )
    return builder


def _imagenet(options: SourceOptions):
    sources = _imagenet_sources(options.data_dir, options.splits)
    return sources, tuple(str(i) for i in range(1000))


REGISTRY = {
    d.name: d
    for d in (
        Dataset("digits", "classification", "test", _built(lambda o: SasaDigits(**_kwargs(o)))),
        Dataset(
            "digits_clutter",
            "classification",
            "test",
            _built(lambda o: SasaDigitsClutter(**_kwargs(o))),
        ),
        Dataset("imagenet2012", "classification", "validation", _imagenet),
        Dataset("image_folder", "classification", "test", _built(_image_folder)),
        Dataset(
            "digit_scenes", "detection", "test", _built(lambda o: SasaDigitScenes(**_kwargs(o)))
        ),
        Dataset("coco", "detection", "validation", lambda o: _coco_sources(o.data_dir, o.splits)),
        Dataset("coco_folder", "detection", "validation", _built(_coco_folder)),
    )
}
DATASETS = tuple(REGISTRY)
DETECTION_DATASETS = tuple(name for name, d in REGISTRY.items() if d.task == "detection")


def dataset_info(name: str) -> Dataset:
    """The registry's entry for ``name``; ValueError naming the datasets for another name."""
    if name not in REGISTRY:
        raise ValueError(f"config.dataset must be one of {DATASETS}, got {name!r}")
    return REGISTRY[name]


def dataset_task(name: str) -> str:
    """ "classification" or "detection": what is learned from dataset ``name``."""
    return dataset_info(name).task


def load_dataset(
    dataset: str,
    *,
    data_dir: str | None = None,
    image_folder: str = "",
    coco_folder: str = "",
    eval_split: str = "",
    minival_percent: int = 4,
) -> DatasetSplits:
    """Opens (building the offline datasets on first use) the train and eval sources.

    Raises:
      ValueError: unknown dataset or split, bad annotations or unreadable images.
      FileNotFoundError: ImageNet or COCO not prepared, or a missing folder.
    """
    info = dataset_info(dataset)
    splits = split_names(dataset, eval_split, minival_percent)
    # TFDS reads TFDS_DATA_DIR once, at import; read it at call time so a later setting counts.
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    options = SourceOptions(data_dir, splits, image_folder, coco_folder)
    (train, evaluation), class_names = info.open(options)
    return DatasetSplits(
        dataset, train, evaluation, len(class_names), *splits, class_names=class_names
    )
