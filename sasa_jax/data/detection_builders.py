"""TFDS builders for detection that prepare offline, without TensorFlow, in array_record.

Records follow ``coco/2017``'s layout, so one pipeline reads all three sources: ``image``,
``image/id``, ``objects`` with ``bbox`` (TFDS ``BBoxFeature``: y1, x1, y2, x2 as fractions of
the image), ``label``, ``is_crowd`` and ``area`` (pixels).

* ``SasaDigitScenes``: the bundled scenes of ``digit_scenes`` (2,500 train, 500 test).
* ``SasaCocoFolder``: a COCO-format folder (``coco_folder.py`` checks it and reads its
  annotations); classes are the JSON's categories in id order. Files Pillow cannot read, or
  whose size differs from the JSON's, are listed in ``unreadable`` while building
  (``sources.load_dataset`` then raises one ValueError naming them).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sasa_jax.data import coco_folder
from sasa_jax.data.builders import load_rgb
from sasa_jax.data.digit_scenes import digit_scenes

SCENES = {"train": 2500, "test": 500}
DIGIT_NAMES = [str(d) for d in range(10)]


def _features(class_names: list[str]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": np.int64,
            "objects": tfds.features.Sequence(
                {
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=class_names),
                    "is_crowd": np.bool_,
                    "area": np.float32,
                }
            ),
        }
    )


def _objects(boxes: np.ndarray, labels, crowd, area, height: int, width: int) -> dict:
    """Pixel boxes ``[n, 4]`` (y1, x1, y2, x2) -> the record's ``objects``."""
    scale = np.asarray([height, width, height, width], np.float32)
    fractions = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4) / scale, 0.0, 1.0)
    return {
        "bbox": [tfds.features.BBox(*map(float, b)) for b in fractions],
        "label": [int(x) for x in labels],
        "is_crowd": [bool(x) for x in crowd],
        "area": [float(x) for x in area],
    }


class SasaDigitScenes(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits placed on 96-128 px canvases: 10 classes, 1-5 objects each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Digit scenes: sklearn digits on varied backgrounds (sasa_jax).",
            features=_features(DIGIT_NAMES),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline from the digits inside scikit-learn
        return {split: self._generate_examples(split) for split in SCENES}

    def _generate_examples(self, split: str):
        scenes = digit_scenes(SCENES[split], test=split == "test", seed=0)
        for index, scene in enumerate(scenes):
            size = scene["image"].shape[0]
            boxes = scene["boxes"]
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            crowd = np.zeros(len(boxes), bool)
            yield (
                index,
                {
                    "image": Image.fromarray(scene["image"]),  # TFDS encodes arrays with TF
                    "image/id": index,
                    "objects": _objects(boxes, scene["labels"], crowd, area, size, size),
                },
            )


def _load_rgb(path: pathlib.Path, width: int, height: int) -> Image.Image | str:
    """The image as RGB (``builders.load_rgb``), or why it cannot be used: unreadable, or
    not the size the annotations give."""
    image = load_rgb(path)
    if isinstance(image, Image.Image) and image.size != (width, height):
        return f"is {image.size[0]}x{image.size[1]}, the annotations say {width}x{height}"
    return image


class SasaCocoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A COCO-format folder; construct with ``folder=``. See ``coco_folder``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, folder: str | os.PathLike, **kwargs):
        self._layout = coco_folder.read_folder(folder)
        self.unreadable: list[tuple[pathlib.Path, str]] = []  # filled while building
        root = self._layout.root
        name = "".join(c if c.isalnum() else "_" for c in root.name.lower())
        config = tfds.core.BuilderConfig(name=f"{name}_{self._layout.fingerprint}")
        super().__init__(config=config, **kwargs)

    @property
    def has_val(self) -> bool:
        """Whether the folder has ``annotations/instances_val.json``."""
        return "validation" in self._layout.splits

    @property
    def class_names(self) -> list[str]:
        return list(self._layout.class_names)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"COCO-format detection data from {self._layout.root}",
            features=_features(self.class_names),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._layout.splits}

    def _generate_examples(self, split: str):
        for image in self._layout.splits[split]:
            rgb = _load_rgb(image.path, image.width, image.height)
            if isinstance(rgb, str):
                self.unreadable.append((image.path, rgb))
                continue
            yield (
                image.image_id,
                {
                    "image": rgb,
                    "image/id": image.image_id,
                    "objects": _objects(
                        image.boxes,
                        image.labels,
                        image.crowd,
                        image.area,
                        image.height,
                        image.width,
                    ),
                },
            )
