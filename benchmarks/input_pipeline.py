"""Images/second of the ImageNet input pipelines (training and eval), and tf.data's beside them.

Ours is the trainer's own code. Training: ``sasa_jax.data.train_dataset`` with the Inception
crop, resize to 224, random flip and batches of 64. Eval: ``sasa_jax.data.eval_batches`` with
the centre crop (0.875 of the shorter side) resized to 224. Both decode in ``--threads`` threads.
The comparison is the flax ImageNet example's fused tf.data recipes on the same files and cores:
``extract_jpeg_shape`` -> ``sample_distorted_bounding_box`` -> ``decode_and_crop_jpeg`` ->
bicubic resize -> flip for training, ``decode_and_crop_jpeg`` of the centre -> bicubic resize
for eval, ``AUTOTUNE`` parallelism. It runs only where TensorFlow imports: TensorFlow is not a
dependency, so install ``tensorflow-cpu`` in a scratch venv for it.

    python benchmarks/input_pipeline.py --seconds 20                    # ours only
    python benchmarks/input_pipeline.py --seconds 20 --tfdata --json    # side by side
    python benchmarks/input_pipeline.py --images /path/to/jpegs         # e.g. make_photos.py's
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image


class FileSource:
    """Random-access records ``{"image": JPEG bytes, "label": 0}`` read from files."""

    def __init__(self, paths):
        self._paths = [str(p) for p in paths]

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, index):
        with open(self._paths[index], "rb") as f:
            return {"image": f.read(), "label": 0}


def make_jpegs(folder: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
    """ImageNet-like JPEGs: 500x375 (and 375x500), smooth structure plus fine texture,
    quality 90. The texture is set so files average ~110 KB, ImageNet's mean file size: the
    entropy decoding that dominates JPEG decode time scales with the bytes."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (500, 375) if i % 4 else (375, 500)
        coarse = rng.random((h // 25 + 1, w // 25 + 1, 3)) * 255
        base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC))
        texture = rng.normal(0, 24, (h, w, 3))
        image = np.clip(base + texture, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


class _Cycle:
    """``source`` repeated ``times`` times, so one eval pass lasts the whole measurement."""

    def __init__(self, source, times: int):
        self._source, self._times = source, times

    def __len__(self):
        return len(self._source) * self._times

    def __getitem__(self, index):
        return self._source[index % len(self._source)]


def _rate(iterator, seconds: float, batch: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch
    return count / (time.perf_counter() - start)


def ours(paths, seconds: float, batch: int, size: int, workers: int, threads: int) -> float:
    from sasa_jax import data

    dataset = data.train_dataset(
        FileSource(paths),
        batch_size=batch,
        augment=data.TrainAugment(size=size),
        seed=0,
        num_workers=workers,
        num_threads=threads,
    )
    return _rate(iter(dataset), seconds, batch)


def ours_eval(paths, seconds: float, batch: int, size: int, workers: int, threads: int) -> float:
    from sasa_jax import data

    batches = data.eval_batches(
        _Cycle(FileSource(paths), 10_000),
        batch_size=batch,
        example=data.ClassificationEval(size),
        num_workers=workers,
        num_threads=threads,
    )
    return _rate(batches, seconds, batch)


def _tf_resize(image, size: int):
    import tensorflow as tf

    image = tf.image.resize([image], [size, size], method=tf.image.ResizeMethod.BICUBIC)[0]
    return tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)


def _tf_rate(paths, fn, seconds: float, batch: int, shuffle: bool) -> float:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths]).repeat()
    if shuffle:
        ds = ds.shuffle(1024)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _rate(iter(ds.as_numpy_iterator()), seconds, batch)


def tfdata_eval(paths, seconds: float, batch: int, size: int, crop_fraction: float = 0.875):
    import tensorflow as tf

    def decode_and_centre_crop(filename):
        image_bytes = tf.io.read_file(filename)
        shape = tf.io.extract_jpeg_shape(image_bytes)
        side = tf.cast(
            tf.round(crop_fraction * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)),
            tf.int32,
        )
        window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
        image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
        return _tf_resize(image, size)

    return _tf_rate(paths, decode_and_centre_crop, seconds, batch, shuffle=False)


def tfdata(paths, seconds: float, batch: int, size: int) -> float:
    import tensorflow as tf

    def decode_and_random_crop(filename):
        image_bytes = tf.io.read_file(filename)
        shape = tf.io.extract_jpeg_shape(image_bytes)
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        offset_y, offset_x, _ = tf.unstack(begin)
        height, width, _ = tf.unstack(crop_size)
        window = tf.stack([offset_y, offset_x, height, width])
        image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
        return tf.image.random_flip_left_right(_tf_resize(image, size))

    return _tf_rate(paths, decode_and_random_crop, seconds, batch, shuffle=True)


class _NoAugment:
    """A training "augmentation" that only hands out a fixed array: the pipeline's own cost."""

    def __init__(self, size: int):
        self._image = np.zeros((size, size, 3), np.uint8)

    def example(self, record, rng):
        del record, rng
        return {"image": self._image, "label": np.int32(0)}


def _ms_per_item(fn, items, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e3


def breakdown(paths, size: int) -> dict[str, float]:
    """Milliseconds per image on one thread: the libraries' decodes and resizes, our train
    and eval examples, and the pipeline's per-record cost without any image work."""
    import cv2

    from sasa_jax import data

    encoded = [pathlib.Path(p).read_bytes() for p in paths]
    pixels = np.asarray(Image.open(io.BytesIO(encoded[0])).convert("RGB"))
    crop = (0, 0, min(pixels.shape[:2]), min(pixels.shape[:2]))
    pil = Image.fromarray(pixels)
    rng = np.random.default_rng(0)
    augment = data.TrainAugment(size=size)
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    out = {
        "pillow_decode_ms": _ms_per_item(lambda b: Image.open(io.BytesIO(b)).load(), encoded),
        "opencv_decode_ms": _ms_per_item(
            lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), flags), encoded
        ),
        "pillow_bilinear_aa_resize_ms": _ms_per_item(
            lambda _: pil.resize((size, size), Image.BILINEAR, box=crop), encoded
        ),
        "opencv_bilinear_resize_ms": _ms_per_item(
            lambda _: cv2.resize(
                pixels[: crop[3], : crop[2]], (size, size), interpolation=cv2.INTER_LINEAR
            ),
            encoded,
        ),
        "train_example_ms": _ms_per_item(lambda b: data.train_image(b, rng, augment), encoded),
        "eval_example_ms": _ms_per_item(lambda b: data.eval_image(b, size), encoded),
    }
    dataset = data.train_dataset(
        FileSource(paths), batch_size=64, augment=_NoAugment(size), seed=0, num_threads=1
    )
    out["pipeline_ms_per_record"] = 1e3 / _rate(iter(dataset), 3.0, 64)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="folder of JPEGs (default: generate 512)")
    parser.add_argument("--count", type=int, default=512, help="JPEGs to generate")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="Grain worker processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="decoding threads (per worker, or in this process)",
    )
    parser.add_argument("--mode", choices=("train", "eval", "both"), default="both")
    parser.add_argument("--tfdata", action="store_true", help="also time tf.data's recipe")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the parts, one thread (ms/image)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes need absl flags parsed

    with tempfile.TemporaryDirectory() as scratch:
        if args.images:
            paths = sorted(
                p
                for p in pathlib.Path(args.images).rglob("*")
                if p.suffix.lower() in (".jpg", ".jpeg")
            )
            if not paths:
                parser.error(f"no .jpg or .jpeg files under {args.images}")
        else:
            paths = make_jpegs(pathlib.Path(scratch), args.count)
        result = {
            "images": len(paths),
            "cores": os.cpu_count(),
            "batch": args.batch,
            "image_size": args.image_size,
            "workers": args.workers,
            "threads": args.threads,
        }
        result["mean_kb"] = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
        timing = (args.seconds, args.batch, args.image_size)
        pipelines = {"train": (ours, tfdata), "eval": (ours_eval, tfdata_eval)}
        for mode in ("train", "eval") if args.mode == "both" else (args.mode,):
            prefix = "" if mode == "train" else "eval_"
            mine, theirs = pipelines[mode]
            rate = mine(paths, *timing, args.workers, args.threads)
            result[f"{prefix}images_per_sec"] = rate
            print(f"{mode:5s} sasa_jax (Grain + OpenCV): {rate:8.1f} images/s", flush=True)
            if args.tfdata:
                tf_rate = theirs(paths, *timing)
                result[f"tfdata_{prefix}images_per_sec"] = tf_rate
                result[f"{prefix}ratio_to_tfdata"] = rate / tf_rate
                print(
                    f"{mode:5s} tf.data fused recipe:      {tf_rate:8.1f} images/s "
                    f"(ours / tf.data = {rate / tf_rate:.2f})",
                    flush=True,
                )
        if args.breakdown:
            parts = breakdown(paths, args.image_size)
            for name, ms in parts.items():
                print(f"{name:30s} {ms:6.3f} ms")
            result["breakdown"] = parts
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
