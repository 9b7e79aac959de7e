"""Input pipelines: builders, preprocessing, sharding, exact eval and resumable iterators."""

from __future__ import annotations

import io
import math
import os

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sasa_jax import data


def _encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def _records(n: int, size: int = 8) -> list[dict]:
    """Records whose image is a flat gray PNG of value ``index % 256``; label = index."""
    return [
        {"image": _encoded(np.full((size, size, 3), i % 256, np.uint8)), "label": i}
        for i in range(n)
    ]


# ------------------------------------------------------------------ sharding and batches


@pytest.mark.parametrize("count", [1, 3, 4])
def test_shards_are_disjoint_and_complete(count):
    shards = [list(data.shard(list(range(10)), i, count)) for i in range(count)]
    flat = sorted(x for s in shards for x in s)
    assert flat == list(range(10))
    assert all(abs(len(a) - len(b)) <= 1 for a in shards for b in shards)


def test_per_process_batch_must_divide():
    assert data.per_process_batch(256, 4) == 64
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.per_process_batch(100, 3)


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_counts_every_example_exactly_once(processes):
    records = _records(37)
    seen, steps = [], set()
    for index in range(processes):
        batches = list(
            data.eval_batches(
                records,
                batch_size=8,
                example=data.ClassificationEval(8, crop_fraction=1.0),
                process_index=index,
                process_count=processes,
            )
        )
        steps.add(len(batches))
        for batch in batches:
            chex.assert_shape(
                [batch["image"], batch["label"], batch["mask"]], [(8, 8, 8, 3), (8,), (8,)]
            )
            seen += batch["label"][batch["mask"]].tolist()
            # the image really is record `label`'s image
            np.testing.assert_array_equal(
                batch["image"][batch["mask"]][:, 0, 0, 0], batch["label"][batch["mask"]] % 256
            )
    assert sorted(seen) == list(range(37))
    assert len(steps) == 1  # every process runs the same number of eval steps
    assert steps.pop() == data.eval_steps(37, 8, processes)


AUGMENT = data.TrainAugment(size=8, area_range=(1.0, 1.0), ratio_range=(1.0, 1.0), flip=False)


def _labels(iterator, batches):
    return [next(iterator)["label"].tolist() for _ in range(batches)]


def _process_batches(records, processes, batches, batch=4, seed=7):
    """Labels of the first ``batches`` per-process batches of each of ``processes``."""
    out = []
    for index in range(processes):
        it = data.TrainIterator(
            data.train_dataset(
                records,
                batch_size=batch,
                augment=AUGMENT,
                seed=seed,
                process_index=index,
                process_count=processes,
            )
        )
        out.append(_labels(it, batches))
    return out


def test_each_epoch_splits_disjointly_over_processes_and_reshuffles():
    records = _records(24)
    per_process = _process_batches(records, 2, 6)  # global batch 8: two epochs of 3 steps
    epochs = [sum((p[e * 3 : (e + 1) * 3] for p in per_process), []) for e in range(2)]
    for epoch in epochs:
        labels = sum(epoch, [])
        assert sorted(labels) == list(range(24))  # disjoint and complete
    assert sum(epochs[0], []) != sum(epochs[1], [])  # a fresh order each epoch


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batch_is_independent_of_the_process_count(processes):
    records = _records(40)
    single = _process_batches(records, 1, 5, batch=8)[0]
    split = _process_batches(records, processes, 5, batch=8 // processes)
    for step in range(5):
        assert sum((p[step] for p in split), []) == single[step]


def test_training_needs_records():
    with pytest.raises(ValueError, match="at least one record"):
        data.train_dataset([], batch_size=2, augment=AUGMENT, seed=0)


def test_training_order_is_a_function_of_the_seed():
    records = _records(30)
    make = lambda seed: data.TrainIterator(  # noqa: E731
        data.train_dataset(records, batch_size=5, augment=AUGMENT, seed=seed)
    )
    assert _labels(make(1), 8) == _labels(make(1), 8)
    assert _labels(make(1), 8) != _labels(make(2), 8)


def test_restored_iterator_continues_with_identical_batches():
    records = _records(20, size=16)
    augment = data.TrainAugment(size=8, area_range=(0.3, 1.0))  # random crops and flips
    dataset = data.train_dataset(records, batch_size=6, augment=augment, seed=3)
    original = data.TrainIterator(dataset)
    for _ in range(3):
        next(original)
    state = original.get_state()
    expected = [next(original) for _ in range(5)]  # crosses an epoch boundary
    restored = data.TrainIterator(dataset, state=state)
    for batch in expected:
        chex.assert_trees_all_equal(next(restored), batch)


def test_prefetch_to_mesh_reports_the_consumed_position():
    records = _records(20)
    dataset = data.train_dataset(records, batch_size=4, augment=AUGMENT, seed=0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    prefetched = data.prefetch_to_mesh(data.TrainIterator(dataset), sharding, size=3)
    first = next(prefetched)
    assert isinstance(first["image"], jax.Array)
    resumed = data.TrainIterator(dataset, state=prefetched.get_state())
    np.testing.assert_array_equal(next(prefetched)["label"], next(resumed)["label"])


# ------------------------------------------------------------------------- the datasets


def test_digits_builds_offline_into_tfds_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    splits = data.load_dataset("digits")
    assert (tmp_path / "sasa_digits").is_dir()
    assert (len(splits.train), len(splits.eval), splits.num_classes) == (1437, 360, 10)
    batch = next(
        data.TrainIterator(
            data.train_dataset(
                splits.train, batch_size=16, augment=data.TrainAugment(size=32, flip=False), seed=0
            )
        )
    )
    chex.assert_shape(batch["image"], (16, 32, 32, 3))
    assert batch["image"].dtype == np.uint8 and batch["image"].max() > 200
    assert set(batch["label"].tolist()) <= set(range(10))
    labels = [splits.eval[i]["label"] for i in range(len(splits.eval))]
    assert sorted(set(labels)) == list(range(10))


def _make_folder(root, layout, classes=("cat", "ant", "bee"), per_class=6):
    rng = np.random.default_rng(0)
    for split in layout:
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = (rng.random((12 + i, 10, 3)) * 60 + 60 * c).astype(np.uint8)
                fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                Image.fromarray(image).save(folder / f"{i}.{ext}", format=fmt)


def test_image_folder_without_split_folders(tmp_path):
    _make_folder(tmp_path / "images", [""], per_class=20)
    splits = data.load_dataset(
        "image_folder", image_folder=str(tmp_path / "images"), data_dir=str(tmp_path / "tfds")
    )
    assert splits.num_classes == 3
    assert len(splits.train) + len(splits.eval) == 60 and 0 < len(splits.eval) < 20
    again = data.load_dataset(
        "image_folder", image_folder=str(tmp_path / "images"), data_dir=str(tmp_path / "tfds")
    )
    assert len(again.eval) == len(splits.eval)  # deterministic held-out split
    labels = {r["label"] for r in (splits.train[i] for i in range(len(splits.train)))}
    assert labels == {0, 1, 2}
    batch = next(
        data.TrainIterator(
            data.train_dataset(
                splits.train, batch_size=8, augment=data.TrainAugment(size=16), seed=0
            )
        )
    )
    chex.assert_shape(batch["image"], (8, 16, 16, 3))


def test_image_folder_with_split_folders_sorts_classes(tmp_path):
    _make_folder(tmp_path / "images", ["train", "validation"])
    splits = data.load_dataset(
        "image_folder", image_folder=str(tmp_path / "images"), data_dir=str(tmp_path / "tfds")
    )
    assert (len(splits.train), len(splits.eval)) == (18, 18)
    record = splits.eval[0]
    names = ["ant", "bee", "cat"]  # sorted
    assert record["file_name"].decode().split(os.sep)[1] == names[record["label"]]
    image = data.eval_image(record["image"], 16)
    assert image.shape == (16, 16, 3)


def test_unreadable_images_are_listed_in_one_error(tmp_path):
    """Bad files in both splits: one ValueError names every one of them, and nothing is left
    built (the same call fails again, it does not train on a partial dataset)."""
    _make_folder(tmp_path / "images", ["train", "test"])
    bad = [
        tmp_path / "images" / "train" / "bee" / "broken.jpg",
        tmp_path / "images" / "train" / "ant" / "empty.png",
        tmp_path / "images" / "test" / "cat" / "truncated.png",
    ]
    bad[0].write_bytes(b"not a jpeg at all")
    bad[1].write_bytes(b"")
    good = (tmp_path / "images" / "test" / "cat" / "0.png").read_bytes()
    bad[2].write_bytes(good[: len(good) // 2])
    for _ in range(2):
        with pytest.raises(ValueError, match="3 image file") as error:
            data.load_dataset(
                "image_folder",
                image_folder=str(tmp_path / "images"),
                data_dir=str(tmp_path / "tfds"),
            )
        for path in bad:
            assert str(path) in str(error.value)


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(
            "image_folder", image_folder=str(tmp_path / "nope"), data_dir=str(tmp_path)
        )


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar") as error:
        data.load_dataset("imagenet2012", data_dir=str(tmp_path))
    assert "tfds build imagenet2012" in str(error.value)


def test_bad_dataset_and_split():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="eval_split"):
        data.load_dataset("digits", eval_split="validation")


def _fake_imagenet(builder, split, decoders=None, **kwargs):
    """Mock ImageNet records as TFDS serves them with SkipDecoding: JPEG bytes."""
    assert decoders is not None  # the real pipeline decodes images itself
    if isinstance(split, list | tuple):
        return [_fake_imagenet(builder, s, decoders) for s in split]
    rng = np.random.default_rng(len(split))
    records = []
    for i in range(23):
        h, w = rng.integers(60, 200, size=2)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        records.append(
            {
                "image": _encoded(image, "JPEG"),
                "label": int(rng.integers(0, 1000)),
                "file_name": f"n{i}.JPEG",
            }
        )
    return records


@pytest.mark.parametrize("eval_split", ["", "minival"])
def test_mock_imagenet_through_the_real_pipeline(tmp_path, eval_split):
    with tfds.testing.mock_data(num_examples=23, as_data_source_fn=_fake_imagenet):
        splits = data.load_dataset("imagenet2012", data_dir=str(tmp_path), eval_split=eval_split)
    assert splits.num_classes == 1000
    assert splits.eval_split == ("train[:4%]" if eval_split else "validation")
    augment = data.TrainAugment(size=64)
    batch = next(
        data.TrainIterator(data.train_dataset(splits.train, batch_size=8, augment=augment, seed=0))
    )
    chex.assert_shape([batch["image"], batch["label"]], [(8, 64, 64, 3), (8,)])
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    assert batch["image"].min() < 30 and batch["image"].max() > 225
    assert ((batch["label"] >= 0) & (batch["label"] < 1000)).all()
    normalized = np.asarray(data.normalize(batch["image"]))
    assert -2.2 < normalized.min() < -1.5 and 2.0 < normalized.max() < 2.7
    batches = list(
        data.eval_batches(splits.eval, batch_size=10, example=data.ClassificationEval(64))
    )
    assert len(batches) == math.ceil(23 / 10)
    assert sum(int(b["mask"].sum()) for b in batches) == 23
