"""Images/second of the ImageNet training input pipeline, and of tf.data's recipe beside it.

Ours is the trainer's own code: ``sasa_jax.data.train_dataset`` with the Inception crop, resize
to 224, random flip and batches of 64, decoding with every core. The comparison is the fused
tf.data recipe of the flax ImageNet example (``extract_jpeg_shape`` ->
``sample_distorted_bounding_box`` -> ``decode_and_crop_jpeg`` -> bicubic resize -> flip ->
batch, ``AUTOTUNE`` parallelism), on the same files and cores. It runs only where TensorFlow
imports: TensorFlow is not a dependency, so install ``tensorflow-cpu`` in a scratch venv for it.

    python benchmarks/input_pipeline.py --seconds 20                    # ours only
    python benchmarks/input_pipeline.py --seconds 20 --tfdata --json    # side by side
    python benchmarks/input_pipeline.py --images /path/to/jpegs
"""

from __future__ import annotations

import argparse
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
        image = tf.image.resize([image], [size, size], method=tf.image.ResizeMethod.BICUBIC)[0]
        image = tf.image.random_flip_left_right(image)
        return tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths]).repeat().shuffle(1024)
    ds = ds.map(decode_and_random_crop, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _rate(iter(ds.as_numpy_iterator()), seconds, batch)


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
    parser.add_argument("--tfdata", action="store_true", help="also time tf.data's recipe")
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
        result["images_per_sec"] = ours(
            paths, args.seconds, args.batch, args.image_size, args.workers, args.threads
        )
        print(f"sasa_jax (Grain + Pillow): {result['images_per_sec']:8.1f} images/s", flush=True)
        if args.tfdata:
            result["tfdata_images_per_sec"] = tfdata(
                paths, args.seconds, args.batch, args.image_size
            )
            result["ratio_to_tfdata"] = result["images_per_sec"] / result["tfdata_images_per_sec"]
            print(
                f"tf.data fused recipe:      {result['tfdata_images_per_sec']:8.1f} images/s "
                f"(ours / tf.data = {result['ratio_to_tfdata']:.2f})"
            )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
