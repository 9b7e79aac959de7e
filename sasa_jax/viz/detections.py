"""Pictures of a detector's boxes (``python -m sasa_jax.visualize`` on a detection run): eval
images, each as two panels -- the ground truth (green, class names) and the detections scoring
at least ``min_score`` (red, class names and scores). Figures are matplotlib's ``Figure`` (no
pyplot: the caller's backend is left alone)."""

from __future__ import annotations

import jax
import numpy as np

from sasa_jax.tasks import DetectionTask


def predict_examples(task: DetectionTask, model, examples: list[dict]) -> dict:
    """Detections (input pixels) for eval ``examples`` (``DetectionEval``'s dicts)."""
    images = {"image": np.stack([e["image"] for e in examples])}
    return jax.tree.map(np.asarray, task.predict(model, task.inputs(images)))


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
    from matplotlib.figure import Figure

    n = len(examples)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3 * 2 * cols, 3 * rows + 0.4))
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
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


__all__ = ["draw_detections", "predict_examples"]
