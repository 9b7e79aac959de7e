"""How well RetinaNet's anchors cover the digit scenes' boxes, per anchor size (no training).

    python benchmarks/anchor_coverage.py --sizes=1.125,1.5,2,2.5 --image_size=96 [--json]

Makes the 500 test scenes (``sasa_jax.data.digit_scenes``, the dataset's own split), resizes
each so its longer side is ``image_size`` (as the eval input is), and for each
``config.detection.anchor_size``: the share of boxes that some anchor overlaps at IoU >= 0.5
(the matcher's positive threshold), that share for the smaller and the larger half of the
boxes (by side), and the mean number of positive anchors per box (anchors whose best box is it,
at IoU >= 0.5). Boxes no anchor reaches are trained as background unless ``force_match``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sasa_jax.data.digit_scenes import digit_scenes
from sasa_jax.detection.anchors import AnchorSpec, anchor_boxes
from sasa_jax.detection.boxes import pairwise_iou

TEST_SCENES = 500


def scaled_boxes(image_size: int) -> list[np.ndarray]:
    """Each test scene's boxes ``[n, 4]`` in the pixels of the resized eval input."""
    out = []
    for scene in digit_scenes(TEST_SCENES, test=True, seed=0):
        side = max(scene["image"].shape[:2])
        out.append(scene["boxes"] * (image_size / side))
    return out


def coverage(scenes: list[np.ndarray], image_size: int, anchor_size: float) -> dict:
    """Matched share (all, smaller half, larger half) and positives per box."""
    anchors = anchor_boxes((image_size, image_size), AnchorSpec(size=anchor_size))
    best, positives, sides = [], [], []
    for boxes in scenes:
        iou = np.asarray(pairwise_iou(anchors, boxes))  # [anchors, boxes]
        best.append(iou.max(axis=0))
        owner = iou.argmax(axis=1)
        positive = iou.max(axis=1) >= 0.5
        positives.append(np.bincount(owner[positive], minlength=len(boxes)))
        sides.append(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    best, positives, sides = map(np.concatenate, (best, positives, sides))
    small = sides <= np.median(sides)
    matched = best >= 0.5
    return {
        "anchor_size": anchor_size,
        "boxes": int(len(best)),
        "matched": float(matched.mean()),
        "matched_smaller_half": float(matched[small].mean()),
        "matched_larger_half": float(matched[~small].mean()),
        "positives_per_box": float(positives.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.125,1.5,2,2.5")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    scenes = scaled_boxes(args.image_size)
    rows = [coverage(scenes, args.image_size, float(s)) for s in args.sizes.split(",")]
    for r in rows:
        print(
            f"anchor_size {r['anchor_size']}: {r['matched']:.2f} of {r['boxes']} boxes matched "
            f"(smaller half {r['matched_smaller_half']:.2f}, larger "
            f"{r['matched_larger_half']:.2f}), {r['positives_per_box']:.1f} positives per box"
        )
    if args.json:
        print(json.dumps({"image_size": args.image_size, "rows": rows}))


if __name__ == "__main__":
    main()
