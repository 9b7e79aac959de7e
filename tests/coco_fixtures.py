"""Tiny COCO-format folders and a tiny prepared ``coco/2017``, with real encoded images, for the
detection tests. Each object is a solid rectangle of its class's colour on a dark background,
so where it lands after preprocessing can be read from the pixels."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

COLOURS = {3: (255, 40, 40), 7: (40, 255, 40), 11: (40, 40, 255)}  # category id -> colour
NAMES = {3: "red", 7: "green", 11: "blue"}


def draw(width: int, height: int, objects) -> np.ndarray:
    """``uint8 [h, w, 3]`` with each ``(category, x, y, w, h)`` a filled rectangle."""
    image = np.full((height, width, 3), 20, np.uint8)
    for category, x, y, w, h in objects:
        image[y : y + h, x : x + w] = COLOURS[category]
    return image


def scene(rng: np.random.Generator, width: int, height: int) -> list:
    """1-3 non-overlapping random objects ``(category, x, y, w, h)`` in whole pixels."""
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(8, 24, 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        clear = all(
            x + w <= ox or ox + ow <= x or y + h <= oy or oy + oh <= y
            for _, ox, oy, ow, oh in objects
        )
        if clear:
            objects.append((int(rng.choice(list(COLOURS))), x, y, w, h))
    return objects


def make_coco_folder(root: pathlib.Path, *, train: int = 6, val: int = 3, seed: int = 0) -> dict:
    """A COCO-format folder of PNGs (sizes vary, 48-80 px); returns its annotations by split."""
    rng = np.random.default_rng(seed)
    annotations = {}
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            width, height = (int(v) for v in rng.integers(48, 81, 2))
            objects = scene(rng, width, height)
            name = f"{split}_{i}.png"
            Image.fromarray(draw(width, height, objects)).save(root / split / name)
            image_id = 100 + i
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for category, x, y, w, h in objects:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        annotations[split] = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": c, "name": NAMES[c]} for c in (11, 3, 7)],  # unsorted ids
        }
        (root / "annotations").mkdir(exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(annotations[split], f)
    return annotations


class Coco2017(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A stand-in for TFDS's ``coco/2017`` with its feature layout, 80 classes, built from a
    tiny folder, so the real reading path (``tfds.builder_from_directory``) is tested."""

    name = "coco"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]

    def __init__(self, *, source: pathlib.Path, **kwargs):
        self._source = source
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image/filename": tfds.features.Text(),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence(
                        {
                            "area": np.int64,
                            "bbox": tfds.features.BBoxFeature(),
                            "id": np.int64,
                            "is_crowd": np.bool_,
                            "label": tfds.features.ClassLabel(num_classes=80),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("val"),
        }

    def _generate_examples(self, split):
        with open(self._source / "annotations" / f"instances_{split}.json") as f:
            content = json.load(f)
        for image in content["images"]:
            anns = [a for a in content["annotations"] if a["image_id"] == image["id"]]
            w, h = image["width"], image["height"]
            yield (
                image["id"],
                {
                    "image": Image.open(self._source / split / image["file_name"]).convert("RGB"),
                    "image/filename": image["file_name"],
                    "image/id": image["id"],
                    "objects": {
                        "area": [a["area"] for a in anns],
                        "bbox": [
                            tfds.features.BBox(
                                a["bbox"][1] / h,
                                a["bbox"][0] / w,
                                (a["bbox"][1] + a["bbox"][3]) / h,
                                (a["bbox"][0] + a["bbox"][2]) / w,
                            )
                            for a in anns
                        ],
                        "id": [a["id"] for a in anns],
                        "is_crowd": [False for _ in anns],
                        "label": [a["category_id"] for a in anns],
                    },
                },
            )
