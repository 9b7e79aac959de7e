"""A folder of natural-photo JPEGs for ``input_pipeline.py``, made offline from bundled photos.

The photos are scikit-learn's two sample images, matplotlib's sample portrait and, where
scikit-image imports, its colour photos (``pip install scikit-image`` adds nine). Each JPEG is
a random crop (50-100% of the side) of one of them, resized to ImageNet's typical 500x375 (one
in four 375x500), randomly mirrored, and saved at the quality that sets the file size:

    python benchmarks/make_photos.py --out /tmp/photos_light --quality 85  # ~35 KB
    python benchmarks/make_photos.py --out /tmp/photos_imagenet --quality 99  # ~118 KB

The last line is JSON: the count, the photos used and the mean file size.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "grass",
    "gravel",
    "brick",
)


def photos() -> dict[str, np.ndarray]:
    """Name -> ``uint8 [h, w, 3]`` of every bundled photo that imports here."""
    import matplotlib.cbook
    import sklearn.datasets

    sample = sklearn.datasets.load_sample_images()
    out = {
        pathlib.Path(name).stem: np.asarray(image)
        for name, image in zip(sample.filenames, sample.images, strict=True)
    }
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        out["grace_hopper"] = np.asarray(image.convert("RGB"))
    try:
        import skimage.data
    except ImportError:
        return out
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 3:
            out[name] = np.asarray(image)[..., :3]
    return out


def make(out: pathlib.Path, count: int, quality: int, side: int = 500, seed: int = 0) -> float:
    """Writes ``count`` JPEGs into ``out``; returns their mean size in KB."""
    sources = list(photos().values())
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        image = sources[i % len(sources)]
        height, width = image.shape[:2]
        fraction = rng.uniform(0.5, 1.0)
        w, h = int(width * fraction), int(height * fraction)
        x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        size = (side, side * 3 // 4) if i % 4 else (side * 3 // 4, side)
        crop = Image.fromarray(image[y : y + h, x : x + w]).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = out / f"{i:05d}.jpg"
        crop.save(path, quality=quality)
        total += path.stat().st_size
    return total / count / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality, 1-100")
    args = parser.parse_args()
    if not 1 <= args.quality <= 100 or args.count < 1:
        parser.error("--quality must be in 1..100 and --count positive")
    mean_kb = make(pathlib.Path(args.out), args.count, args.quality)
    names = sorted(photos())
    print(f"{args.count} JPEGs from {len(names)} photos, {mean_kb:.1f} KB on average")
    print(json.dumps({"count": args.count, "photos": names, "mean_kb": mean_kb}))


if __name__ == "__main__":
    main()
