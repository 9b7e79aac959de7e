r"""Writes a COCO-format detection folder of three object kinds on photographic backgrounds.

  python benchmarks/make_coco_folder.py --out /tmp/shapes_coco [--train 640 --val 160] [--json]

Backgrounds are random crops (10-100% of the side, random flips and brightness) of the two
photographs that ship with scikit-learn (``load_sample_images``: a temple and a flower), resized
to 128x128. Each image has 1-4 objects of 14-44 px: a shaded disc, a triangle or a ring, each
of a random colour (the kind, not the colour, is the class), partly transparent, overlapping
other objects with IoU <= 0.3. JPEG files plus ``annotations/instances_{train,val}.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("disc", "triangle", "ring")
SIZE = 128


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _background(rng, photos) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.1, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y : y + side, x : x + side].astype(np.float32) * rng.uniform(0.6, 1.3)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
    return image.resize((SIZE, SIZE), Image.BILINEAR)


def _shape_mask(kind: str, w: int, h: int, rng) -> Image.Image:
    """An ``L`` mask of the object, ``w x h``, touching all four sides."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "disc":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif kind == "triangle":
        apex = rng.uniform(0.2, 0.8) * (w - 1)
        draw.polygon([(apex, 0), (0, h - 1), (w - 1, h - 1)], fill=255)
    else:
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        t = max(3, int(min(w, h) * 0.25))
        draw.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    return mask


def _iou(a, b) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def make_image(rng, photos):
    """``(PIL image, [(kind index, [x, y, w, h])])``."""
    image = _background(rng, photos)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        side = rng.uniform(14, 44)
        w = int(np.clip(side * rng.uniform(0.8, 1.25), 14, 44))
        h = int(np.clip(side * rng.uniform(0.8, 1.25), 14, 44))
        for _ in range(20):
            box = [int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1)), w, h]
            if all(_iou(box, other) <= 0.3 for _, other in objects):
                break
        else:
            continue
        kind = int(rng.integers(len(KINDS)))
        mask = _shape_mask(KINDS[kind], w, h, rng)
        alpha = np.asarray(mask, np.float32) * rng.uniform(0.8, 1.0)
        colour = rng.uniform(0, 255, 3)
        shade = np.linspace(1.15, 0.75, h)[:, None, None]  # lit from above
        fill = np.clip(colour * shade * np.ones((h, w, 1)), 0, 255)
        region = np.asarray(image, np.float32)[box[1] : box[1] + h, box[0] : box[0] + w]
        blended = region * (1 - alpha[..., None] / 255) + fill * (alpha[..., None] / 255)
        array = np.asarray(image).copy()
        array[box[1] : box[1] + h, box[0] : box[0] + w] = blended.astype(np.uint8)
        image = Image.fromarray(array)
        objects.append((kind, box))
    return image, objects


def write_split(out: pathlib.Path, split: str, count: int, rng, photos) -> int:
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = make_image(rng, photos)
        name = f"{i:05d}.jpg"
        image.save(out / split / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for kind, box in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": kind + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    content = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(KINDS)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(content, f)
    return len(annotations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--train", type=int, default=640)
    parser.add_argument("--val", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = _photos()
    counts = {
        split: write_split(args.out, split, n, rng, photos)
        for split, n in (("train", args.train), ("val", args.val))
    }
    result = {
        "out": str(args.out),
        "images": {"train": args.train, "val": args.val},
        "objects": counts,
    }
    print(json.dumps(result) if args.json else f"wrote {result}")


if __name__ == "__main__":
    main()
