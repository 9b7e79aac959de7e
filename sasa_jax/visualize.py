r"""Pictures of what a trained model's attention looks at, or of what a detector finds.

  python -m sasa_jax.visualize --workdir=DIR [--image=PATH] [--out=FILE.png]

Loads the latest checkpoint of a ``train.py`` run. For a classifier it runs one image
(``--image``, or the first image of the run's eval split) and draws each attention layer's
weights and relative logits (``sasa_jax.viz.attention_maps``; ``DIR/attention.png``). For a
detection run it draws the first eval images with the detections beside the ground truth
(``sasa_jax.viz.detections``; ``DIR/detections.png``).
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags

from sasa_jax import cli, data, tasks
from sasa_jax.train.restore import load_run
from sasa_jax.viz.attention_maps import attention_maps, draw
from sasa_jax.viz.detections import draw_detections, predict_examples


def load_image(config, path: str | None) -> np.ndarray:
    """``uint8 [s, s, 3]``: ``path`` preprocessed like eval, or the eval split's first image."""
    if path:
        encoded = pathlib.Path(path).read_bytes()
    else:
        encoded = data.load_dataset_from_config(config).eval[0]["image"]
    return data.eval_image(encoded, config.image_size, config.eval_crop_fraction)


def visualize_detections(config, model, step: int, workdir: str, out: str | None, count=8) -> str:
    """Draws the first ``count`` eval images of a detection run; returns the PNG's path
    (default ``workdir/detections.png``)."""
    splits = data.load_dataset_from_config(config)
    task = tasks.DetectionTask(config, splits.num_classes)
    transform = task.eval_example()
    examples = [transform(i, splits.eval[i]) for i in range(min(count, len(splits.eval)))]
    found = predict_examples(task, model, examples)
    fig = draw_detections(examples, found, splits.class_names, title=f"{workdir} (step {step})")
    out = out or str(pathlib.Path(workdir) / "detections.png")
    fig.savefig(out, dpi=80)
    return out


def visualize(workdir: str, image_path: str | None = None, out: str | None = None) -> str:
    """Draws the figure for a run; returns the PNG's path (default ``workdir/attention.png``,
    or ``detections.png`` for a detection run)."""
    if not pathlib.Path(workdir).is_dir():
        raise FileNotFoundError(f"no such workdir: {workdir}")
    config, model, step = load_run(workdir)
    task = tasks.make_task(config, config.model.num_classes)
    if isinstance(task, tasks.DetectionTask):
        if image_path:
            raise ValueError(
                "--image is for classification runs; a detection run draws its eval images"
            )
        return visualize_detections(config, model, step, workdir, out)
    pixels = load_image(config, image_path)
    maps = attention_maps(model, np.asarray(task.inputs({"image": pixels})))
    fig = draw(pixels / 255.0, maps, title=f"{workdir} (step {step})")
    out = out or str(pathlib.Path(workdir) / "attention.png")
    fig.savefig(out, dpi=80)
    return out


def main() -> None:
    """``python -m sasa_jax.visualize --workdir=DIR [--image=PATH] [--out=FILE.png]``. The
    flags are defined here, not on import."""
    workdir = flags.DEFINE_string("workdir", None, "A train.py workdir.")
    image = flags.DEFINE_string("image", None, "An image file (default: the eval split's first).")
    out = flags.DEFINE_string(
        "out", None, "The PNG to write (default: WORKDIR/attention.png or detections.png)."
    )

    def run(argv) -> None:
        cli.no_positional_arguments(argv)
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        with cli.user_errors("sasa_jax.visualize"):
            print(visualize(workdir.value, image.value, out.value))

    app.run(run)


if __name__ == "__main__":
    main()
