"""Pictures of a detection run: eval images with the model's boxes beside the ground truth.

``python -m sasa_jax.visualize --workdir=DIR`` calls ``visualize_detections`` for a detection
run: the first ``count`` eval images, each as two panels -- the ground truth (green, class
names) and the detections scoring at least ``min_score`` (red, class names and scores).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from sasa_jax import data
from sasa_jax.detection.task import DetectionTask


def predict_examples(config, model, examples: list[dict], num_classes: int) -> dict:
    """Detections (input pixels) for eval ``examples`` (``DetectionEval``'s dicts)."""
    from sasa_jax.train_steps import compute_dtype

    task = DetectionTask(config, num_classes)
    images = np.stack([e["image"] for e in examples])
    found = task.predict(model, data.normalize(images, dtype=compute_dtype(config)))
    return jax.tree.map(np.asarray, found)


def _boxes(ax, boxes, labels, colour) -> None:
    from matplotlib.patches import Rectangle

    for (y1, x1, y2, x2), label in zip(boxes, labels, strict=True):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.5))
        ax.text(
            x1,
            y1,
            label,
            color="white",
            fontsize=7,
            va="bottom",
            bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "lw": 0},
        )


def draw_detections(examples, found, class_names, *, min_score: float = 0.3, title: str = ""):
    """A matplotlib figure: per example, ground truth (left) and detections (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(examples)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(3 * 2 * cols, 3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, example in enumerate(examples):
        left, right = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        for ax in (left, right):
            ax.imshow(example["image"])
        real = example["gt_valid"]
        names = [class_names[c] for c in example["gt_classes"][real]]
        _boxes(left, example["gt_boxes"][real] * example["scale"], names, "tab:green")
        keep = found["valid"][k] & (found["scores"][k] >= min_score)
        labels = [
            f"{class_names[c]} {s:.2f}"
            for c, s in zip(found["classes"][k][keep], found["scores"][k][keep], strict=True)
        ]
        _boxes(right, found["boxes"][k][keep], labels, "tab:red")
        left.set_title("ground truth", fontsize=8)
        right.set_title(f"detections (score >= {min_score})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def visualize_detections(
    config, model, step: int, workdir: str, out: str | None = None, count: int = 8
) -> str:
    """Draws the first ``count`` eval images of a detection run; returns the PNG's path
    (default ``workdir/detections.png``)."""
    splits = data.load_dataset_from_config(config)
    transform = data.DetectionEval(config.image_size, config.detection.max_boxes)
    examples = [transform(i, splits.eval[i]) for i in range(min(count, len(splits.eval)))]
    found = predict_examples(config, model, examples, splits.num_classes)
    fig = draw_detections(examples, found, splits.class_names, title=f"{workdir} (step {step})")
    out = out or str(pathlib.Path(workdir) / "detections.png")
    fig.savefig(out, dpi=80)
    return out
