"""COCO-format folders: COCO 2017's layout, checked before anything is built.

    DIR/annotations/instances_train.json   DIR/train/*.jpg|png   (or train2017/)
    DIR/annotations/instances_val.json     DIR/val/*.jpg|png     (or val2017/)

``read_folder`` parses the annotations (``images``, ``annotations`` with ``bbox`` as
``[x, y, width, height]`` pixels, ``categories``) and raises one ValueError that lists every
bad annotation: a box outside its image or without area, an unknown category id, an unknown
image id, a missing image file. ``folder_statistics`` gives what ``configs/coco_folder.py``
sizes a detector by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from sasa_jax.data.errors import listing_error

SPLITS = {"train": ("train", "train2017"), "validation": ("val", "val2017")}
JSON = {"train": "instances_train.json", "validation": "instances_val.json"}
TOLERANCE = 1.0  # pixels a box may pass the image's edge (rounding in exported labels)


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image and its objects; ``boxes [n, 4]`` are (y1, x1, y2, x2) pixels and
    ``labels`` index ``FolderLayout.class_names``."""

    image_id: int
    path: pathlib.Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    area: np.ndarray


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    root: pathlib.Path
    class_names: tuple[str, ...]
    splits: dict[str, list[ImageEntry]]
    fingerprint: str


def _load_json(path: pathlib.Path) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in content]
    if missing:
        raise ValueError(f"{path} lacks the COCO keys {missing}")
    return content


def _image_dir(root: pathlib.Path, split: str) -> pathlib.Path:
    for name in SPLITS[split]:
        if (root / name).is_dir():
            return root / name
    return root / SPLITS[split][0]


def _box_problem(box, width: int, height: int) -> str | None:
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return f"box {list(box)} has no area"
    if x < -TOLERANCE or y < -TOLERANCE or x + w > width + TOLERANCE or y + h > height + TOLERANCE:
        return f"box {list(box)} (x, y, w, h) is outside the {width}x{height} image"
    return None


def _parse_split(root, split, content, category_index, problems) -> list[ImageEntry]:
    json_name = f"annotations/{JSON[split]}"
    folder = _image_dir(root, split)
    images = {int(im["id"]): im for im in content["images"]}
    objects: dict[int, list] = {i: [] for i in images}
    for ann in content["annotations"]:
        where = f"{json_name}: annotation {ann.get('id', '?')}"
        image = images.get(int(ann["image_id"]))
        if image is None:
            problems.append(f"{where}: unknown image id {ann['image_id']}")
            continue
        if int(ann["category_id"]) not in category_index:
            problems.append(f"{where}: unknown category id {ann['category_id']}")
            continue
        problem = _box_problem(ann["bbox"], int(image["width"]), int(image["height"]))
        if problem:
            problems.append(f"{where} on {image['file_name']}: {problem}")
            continue
        objects[int(image["id"])].append(ann)
    entries = []
    for image_id, image in images.items():
        path = folder / image["file_name"]
        if not path.is_file():
            problems.append(f"{json_name}: image {image_id}: missing file {path}")
            continue
        anns = objects[image_id]
        xywh = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        w, h = int(image["width"]), int(image["height"])
        boxes = np.stack(
            [xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], -1
        )
        boxes = np.clip(boxes, 0, np.asarray([h, w, h, w], np.float32))
        entries.append(
            ImageEntry(
                image_id=image_id,
                path=path,
                width=w,
                height=h,
                boxes=boxes,
                labels=np.asarray([category_index[int(a["category_id"])] for a in anns], np.int64),
                crowd=np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
                area=np.asarray(
                    [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float32
                ),
            )
        )
    return entries


def _fingerprint(root: pathlib.Path, splits) -> str:
    digest = hashlib.sha1(str(root).encode())
    for split in splits:
        stat = (root / "annotations" / JSON[split]).stat()
        digest.update(f"{split}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def read_folder(folder) -> FolderLayout:
    """Parses and checks a COCO-format folder.

    Raises:
      FileNotFoundError: no folder or no ``annotations/instances_train.json``.
      ValueError: bad annotations (all listed) or no categories.
    """
    root = pathlib.Path(folder).expanduser().resolve()
    train_json = root / "annotations" / JSON["train"]
    if not train_json.is_file():
        raise FileNotFoundError(
            f"no {train_json}; a COCO-format folder has annotations/instances_train.json "
            "(and instances_val.json) beside train/ and val/ image folders"
        )
    present = [s for s in SPLITS if (root / "annotations" / JSON[s]).is_file()]
    contents = {split: _load_json(root / "annotations" / JSON[split]) for split in present}
    categories = sorted(contents["train"]["categories"], key=lambda c: int(c["id"]))
    if not categories:
        raise ValueError(f"{train_json} has no categories")
    category_index = {int(c["id"]): i for i, c in enumerate(categories)}
    problems: list[str] = []
    splits = {
        split: _parse_split(root, split, contents[split], category_index, problems)
        for split in present
    }
    if problems:
        raise listing_error(f"{len(problems)} bad annotation(s) in {root}", problems)
    names = tuple(str(c.get("name", c["id"])) for c in categories)
    return FolderLayout(root, names, splits, _fingerprint(root, present))


def folder_statistics(folder) -> dict:
    """What a detector for this folder needs, from its training annotations:
    ``num_classes``, ``image_size`` (the 90th percentile of the longer side, rounded up to a
    multiple of 32), ``small_object`` (the 5th percentile of sqrt(box area)) and
    ``max_objects`` (the most objects in one image, over both splits), ``train_images``."""
    layout = read_folder(folder)
    train = layout.splits["train"]
    if not train:
        raise ValueError(f"{layout.root} has no training images")
    sides = np.asarray([max(e.width, e.height) for e in train], np.float64)
    boxes = np.concatenate([e.boxes for e in train])
    if not len(boxes):
        raise ValueError(f"{layout.root}'s training images have no objects")
    sizes = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    every = [e for entries in layout.splits.values() for e in entries]
    return {
        "num_classes": len(layout.class_names),
        "image_size": int(32 * np.ceil(np.percentile(sides, 90) / 32)),
        "small_object": float(np.percentile(sizes, 5)),
        "max_objects": int(max(len(e.boxes) for e in every)),
        "train_images": len(train),
    }
