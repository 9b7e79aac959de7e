"""Writes a folder of small natural-image patches in 6 classes, for configs/image_folder.py.

Each class is one photograph that ships inside scikit-image (not a dependency of this project:
``pip install scikit-image`` in a scratch venv, or pass --images with your own photos).
Patches are random crops of 1/8-1/3 of the shorter side, resized to --size, half saved as PNG
and half as JPEG; the layout is DIR/<class>/<n>.{png,jpg}.

    python benchmarks/make_patches.py --out /tmp/patches            # 6 x 170 = 1,020 patches
    python train.py --config=configs/image_folder.py:/tmp/patches --workdir=/tmp/wd_patches
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
)


def _skimage_photos() -> list[pathlib.Path]:
    import skimage

    folder = pathlib.Path(skimage.__file__).parent / "data"
    return [folder / name for name in PHOTOS]


def make_patches(
    out: pathlib.Path, photos: list[pathlib.Path], per_class: int, size: int, seed: int = 0
) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {}
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        width, height = image.size
        name = photo.stem.split("_")[0]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            side = int(rng.uniform(1 / 8, 1 / 3) * min(width, height))
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            patch = image.resize(
                (size, size), Image.BILINEAR, box=(left, top, left + side, top + side)
            )
            if n % 2:
                patch.save(folder / f"{n:04d}.jpg", quality=90)
            else:
                patch.save(folder / f"{n:04d}.png")
        counts[name] = per_class
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--images",
        nargs="+",
        help="photos, one class each (default: 6 that ship inside scikit-image)",
    )
    parser.add_argument("--per_class", type=int, default=170)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    photos = [pathlib.Path(p) for p in args.images] if args.images else _skimage_photos()
    counts = make_patches(pathlib.Path(args.out), photos, args.per_class, args.size)
    print(f"wrote {sum(counts.values())} patches in {len(counts)} classes to {args.out}")
    if args.json:
        print(json.dumps({"classes": counts, "out": args.out}))


if __name__ == "__main__":
    main()
