"""Detection data: the COCO-folder builder and its checks, prepared COCO 2017, the bundled
scenes' builder, and the training and eval preprocessing (checked against the pixels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sasa_jax import data
from sasa_jax.data import coco_folder, detection_builders
from tests import coco_fixtures


def _pixel_boxes(record, height, width):
    bbox = np.asarray(record["objects"]["bbox"], np.float32).reshape(-1, 4)
    return bbox * [height, width, height, width]


def test_coco_folder_builds_with_classes_from_the_categories(tmp_path):
    annotations = coco_fixtures.make_coco_folder(tmp_path / "folder")
    splits = data.load_dataset(
        "coco_folder", data_dir=str(tmp_path / "tfds"), coco_folder=str(tmp_path / "folder")
    )
    assert splits.class_names == ("red", "green", "blue")  # category ids 3, 7, 11 in id order
    assert (len(splits.train), len(splits.eval)) == (6, 3)
    index = {3: 0, 7: 1, 11: 2}
    images = {image["id"]: image for image in annotations["val"]["images"]}
    assert sorted(int(r["image/id"]) for r in splits.eval) == sorted(images)
    for record in splits.eval:
        image = images[int(record["image/id"])]
        anns = [a for a in annotations["val"]["annotations"] if a["image_id"] == image["id"]]
        expected = np.asarray([[y, x, y + h, x + w] for x, y, w, h in (a["bbox"] for a in anns)])
        got = _pixel_boxes(record, image["height"], image["width"])
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert list(record["objects"]["label"]) == [index[a["category_id"]] for a in anns]


def test_coco_folder_lists_every_bad_annotation(tmp_path):
    root = tmp_path / "folder"
    coco_fixtures.make_coco_folder(root)
    path = root / "annotations" / "instances_train.json"
    content = json.loads(path.read_text())
    first = content["images"][0]
    content["annotations"] += [
        {
            "id": 901,
            "image_id": first["id"],
            "category_id": 3,
            "bbox": [first["width"] - 5, 2, 20, 10],
        },
        {"id": 902, "image_id": first["id"], "category_id": 5, "bbox": [1, 1, 5, 5]},
        {"id": 903, "image_id": first["id"], "category_id": 7, "bbox": [1, 1, 0, 5]},
        {"id": 904, "image_id": 999, "category_id": 7, "bbox": [1, 1, 5, 5]},
    ]
    content["images"].append({"id": 555, "file_name": "gone.png", "width": 50, "height": 50})
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        data.load_dataset("coco_folder", data_dir=str(tmp_path / "tfds"), coco_folder=str(root))
    message = str(error.value)
    assert "5 bad annotation(s)" in message
    assert "annotation 901" in message and "outside" in message
    assert "annotation 902" in message and "unknown category id 5" in message
    assert "annotation 903" in message and "no area" in message
    assert "annotation 904" in message and "unknown image id 999" in message
    assert "gone.png" in message and "missing file" in message
    assert not (tmp_path / "tfds").exists()  # checked before anything is built


def test_coco_folder_without_val_or_annotations(tmp_path):
    root = tmp_path / "folder"
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        data.load_dataset("coco_folder", data_dir=str(tmp_path / "tfds"), coco_folder=str(root))
    coco_fixtures.make_coco_folder(root)
    (root / "annotations" / "instances_val.json").unlink()
    with pytest.raises(FileNotFoundError, match="eval_split=minival"):
        data.load_dataset("coco_folder", data_dir=str(tmp_path / "tfds"), coco_folder=str(root))
    splits = data.load_dataset(
        "coco_folder",
        data_dir=str(tmp_path / "tfds"),
        coco_folder=str(root),
        eval_split="minival",
        minival_percent=50,
    )
    assert len(splits.train) + len(splits.eval) == 6


def test_coco_folder_image_of_another_size_is_listed(tmp_path):
    root = tmp_path / "folder"
    coco_fixtures.make_coco_folder(root)
    path = root / "annotations" / "instances_val.json"
    content = json.loads(path.read_text())
    content["images"][1]["width"] += 3
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="(?s)1 image file.*val_1.png: is .* the annotations say"):
        data.load_dataset("coco_folder", data_dir=str(tmp_path / "tfds"), coco_folder=str(root))


def test_folder_statistics(tmp_path):
    annotations = coco_fixtures.make_coco_folder(tmp_path / "folder")
    stats = coco_folder.folder_statistics(tmp_path / "folder")
    sides = [max(i["width"], i["height"]) for i in annotations["train"]["images"]]
    sizes = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in annotations["train"]["annotations"]]
    counts = [
        sum(a["image_id"] == i["id"] for a in annotations[s]["annotations"])
        for s in annotations
        for i in annotations[s]["images"]
    ]
    assert stats == {
        "num_classes": 3,
        "image_size": int(32 * np.ceil(np.percentile(sides, 90) / 32)),
        "small_object": pytest.approx(float(np.percentile(sizes, 5)), rel=1e-5),
        "max_objects": max(counts),
        "train_images": 6,
    }


def test_prepared_coco_2017_is_read_without_tensorflow(tmp_path):
    coco_fixtures.make_coco_folder(tmp_path / "folder", train=3, val=2)
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match="tfds build coco/2017"):
        data.load_dataset("coco", data_dir=str(tfds_dir))
    builder = coco_fixtures.Coco2017(source=tmp_path / "folder", data_dir=str(tfds_dir))
    builder.download_and_prepare(file_format="array_record")
    splits = data.load_dataset("coco", data_dir=str(tfds_dir))
    assert (splits.num_classes, len(splits.train), len(splits.eval)) == (80, 3, 2)
    assert isinstance(splits.train[0]["image"], bytes)  # decoded by the pipeline, not TFDS
    example = data.DetectionEval(size=128, max_boxes=4)(0, splits.eval[0])
    assert example["gt_valid"].sum() == len(splits.eval[0]["objects"]["label"])


def test_digit_scenes_builder(tmp_path, monkeypatch):
    monkeypatch.setattr(detection_builders, "SCENES", {"train": 5, "test": 3})
    splits = data.load_dataset("digit_scenes", data_dir=str(tmp_path))
    assert (len(splits.train), len(splits.eval), splits.num_classes) == (5, 3, 10)
    from sasa_jax.data.digit_scenes import digit_scenes

    scenes = list(digit_scenes(3, test=True, seed=0))
    for record in splits.eval:
        scene = scenes[int(record["image/id"])]
        size = scene["image"].shape[0]
        np.testing.assert_array_equal(
            data.detection_preprocess.decode_rgb(record["image"]), scene["image"]
        )
        np.testing.assert_allclose(_pixel_boxes(record, size, size), scene["boxes"], atol=1e-3)
        np.testing.assert_array_equal(record["objects"]["label"], scene["labels"])


def _white_box(image: np.ndarray, colour) -> np.ndarray | None:
    """The tight ``(y1, x1, y2, x2)`` box of the pixels near ``colour``."""
    near = np.all(np.abs(image.astype(int) - colour) < 60, -1)
    rows, cols = np.nonzero(near)
    if not len(rows):
        return None
    return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)


def _record(width, height, objects):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(coco_fixtures.draw(width, height, objects)).save(buffer, format="PNG")
    return {
        "image": buffer.getvalue(),
        "objects": {
            "bbox": np.asarray(
                [
                    [y / height, x / width, (y + h) / height, (x + w) / width]
                    for _, x, y, w, h in objects
                ],
                np.float32,
            ),
            "label": np.asarray([{3: 0, 7: 1, 11: 2}[c] for c, *_ in objects]),
        },
    }


def test_training_boxes_follow_jitter_crop_and_flip():
    objects = [(3, 10, 30, 30, 20), (11, 60, 5, 14, 40)]
    record = _record(90, 70, objects)
    augment = data.DetectionAugment(size=64, max_boxes=4, scale_range=(0.6, 1.6), flip=True)
    flipped = 0
    for seed in range(12):
        out = augment.example(record, np.random.default_rng(seed))
        assert out["image"].shape == (64, 64, 3) and out["boxes"].shape == (4, 4)
        valid = out["valid"]
        for box, label in zip(out["boxes"][valid], out["classes"][valid], strict=True):
            colour = coco_fixtures.COLOURS[(3, 7, 11)[label]]
            seen = _white_box(out["image"], colour)
            np.testing.assert_allclose(box, seen, atol=1.5)
        for label in range(3):  # a colour in view belongs to a kept box (>= 30% visible)
            if (
                label not in out["classes"][valid]
                and _white_box(out["image"], coco_fixtures.COLOURS[(3, 7, 11)[label]]) is not None
            ):
                seen = _white_box(out["image"], coco_fixtures.COLOURS[(3, 7, 11)[label]])
                area = (seen[2] - seen[0]) * (seen[3] - seen[1])
                assert area < 0.3 * 40 * 30 * 1.6**2
        flipped += bool(valid.any()) and out["boxes"][0, 1] > 32
    assert 0 < flipped  # both orientations occur


def test_eval_resizes_the_longer_side_and_keeps_original_boxes():
    objects = [(7, 10, 30, 30, 20)]
    record = _record(100, 50, objects)
    out = data.DetectionEval(size=64, max_boxes=3)(5, record)
    assert out["scale"] == pytest.approx(0.64) and out["index"] == 5 and out["mask"]
    np.testing.assert_allclose(out["gt_boxes"][0], [30, 10, 50, 40])
    assert out["gt_valid"].tolist() == [True, False, False]
    assert not out["image"][33:].any()  # padding below the 32-px-high image
    np.testing.assert_allclose(
        _white_box(out["image"], coco_fixtures.COLOURS[7]), out["gt_boxes"][0] * 0.64, atol=1.5
    )
    with pytest.raises(ValueError, match="raise config.max_boxes"):
        data.DetectionEval(size=64, max_boxes=0)(0, record)
