"""Random-access sources (TFDS ``data_source``, array_record) for each dataset by name.

Records are dicts with ``image`` (encoded bytes: images are not decoded here) and ``label``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from sasa_jax.data.builders import SasaDigits, SasaImageFolder

DATASETS = ("digits", "imagenet2012", "image_folder")
DEFAULT_EVAL_SPLIT = {"digits": "test", "imagenet2012": "validation", "image_folder": "test"}
NUM_CLASSES = {"digits": 10, "imagenet2012": 1000}
SKIP_DECODING = {"image": tfds.decode.SkipDecoding()}

IMAGENET_HELP = """ImageNet 2012 is not prepared in array_record format under {data_dir}.
Prepare it once (this step needs TensorFlow: pip install -e ".[imagenet]"):
  1. Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in
     {data_dir}/downloads/manual/
  2. Run:  tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record
Training reads it without TensorFlow. Set --config.data_dir (or TFDS_DATA_DIR) to point
elsewhere."""


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The train and eval sources of a dataset; each is a sequence of records."""

    name: str
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    num_classes: int
    train_split: str
    eval_split: str


def split_names(dataset: str, eval_split: str, minival_percent: int) -> tuple[str, str]:
    """TFDS split strings for training and evaluation.

    ``eval_split="minival"`` holds out the first ``minival_percent`` % of train (the paper
    held out 4%) and trains on the rest.
    """
    eval_split = eval_split or DEFAULT_EVAL_SPLIT[dataset]
    if eval_split == "minival":
        if not 0 < minival_percent < 100:
            raise ValueError(f"minival_percent must be in (0, 100), got {minival_percent}")
        return f"train[{minival_percent}%:]", f"train[:{minival_percent}%]"
    if eval_split != DEFAULT_EVAL_SPLIT[dataset]:
        raise ValueError(
            f"eval_split for {dataset} must be {DEFAULT_EVAL_SPLIT[dataset]!r} or "
            f"'minival', got {eval_split!r}"
        )
    return "train", eval_split


# At most this many unreadable files are named in the error (then how many more there are).
LISTED_FILES = 20


def _unreadable_error(unreadable: list) -> ValueError:
    lines = [f"  {path}: {reason}" for path, reason in unreadable[:LISTED_FILES]]
    if len(unreadable) > LISTED_FILES:
        lines.append(f"  ... and {len(unreadable) - LISTED_FILES} more")
    return ValueError(
        f"{len(unreadable)} image file(s) cannot be read:\n"
        + "\n".join(lines)
        + "\nFix or remove them, then run again."
    )


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


def load_dataset(
    dataset: str,
    *,
    data_dir: str | None = None,
    image_folder: str = "",
    eval_split: str = "",
    minival_percent: int = 4,
) -> DatasetSplits:
    """Opens (building the offline datasets on first use) the train and eval sources.

    Raises:
      ValueError: unknown dataset or split.
      FileNotFoundError: ImageNet not prepared, or a missing image folder.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    splits = split_names(dataset, eval_split, minival_percent)
    # TFDS reads TFDS_DATA_DIR once, at import; read it at call time so a later setting counts.
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    if dataset == "imagenet2012":
        train, evaluation = _imagenet_sources(data_dir, splits)
        num_classes = NUM_CLASSES[dataset]
    else:
        if dataset == "digits":
            builder = SasaDigits(data_dir=data_dir, file_format="array_record")
        else:
            if not image_folder:
                raise ValueError(
                    "dataset 'image_folder' needs config.image_folder, e.g. "
                    "--config=configs/image_folder.py:/path/to/images"
                )
            builder = SasaImageFolder(
                folder=image_folder, data_dir=data_dir, file_format="array_record"
            )
        builder = _prepared_builder(builder)
        train, evaluation = builder.as_data_source(split=list(splits), decoders=SKIP_DECODING)
        num_classes = builder.info.features["label"].num_classes
    return DatasetSplits(dataset, train, evaluation, num_classes, *splits)
