r"""Cluttered digits: the bundled harder dataset, for ablations (48x48, 10 classes).

One of scikit-learn's digits, scaled up to 20-34 px at a random position among 4-8 clutter
fragments cut from other digits (sasa_jax/data/digits_clutter.py); 5,748 train and 1,440
test images, built offline on first use. It trains the same small attention ResNet as
configs/digits.py (ResNet-26 layout, widths x0.25, attention in every stage, 5x5 windows):

  python train.py --config=configs/digits_clutter.py --workdir=/tmp/sasa_clutter

Expect a test top-1 (the last eval_top1 in metrics.jsonl) of about 0.84 (measured 2026-12-05
at 84d0544 on a 2-core Xeon: 0.848; seeds 1-4: 0.840, 0.849, 0.848, 0.829) in about 100 s,
from an empty TFDS data dir; the README's results table. The argument selects model fields like
configs/imagenet.py, e.g. --config=configs/digits_clutter.py:variant=baseline.
docs/ablations.md sweeps them with python -m sasa_jax.sweep (Tables 3-7, at this config's
10 epochs).
"""

import pathlib

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    """configs/digits.py's model and recipe, on the cluttered digits at 48x48."""
    config = config_lib.from_file(pathlib.Path(__file__).with_name("digits.py"), arg)
    config.dataset = "digits_clutter"
    config.image_size = 48
    config.num_epochs = 10
    config.crop_area_min = 0.85  # smaller crops can cut the digit off
    config.crop_ratio_min = 0.9
    config.crop_ratio_max = 1.1
    # Grey digits on black: the pixels are scaled, not centred, so black stays 0 (ImageNet's
    # mean and std put it at -2.1). Worth 2 points to the conv stem and 6 to the paper's
    # attention stem (docs/attention_at_small_scale.md, "Black at zero").
    config.pixel_mean = (0.0, 0.0, 0.0)
    config.pixel_std = (0.3, 0.3, 0.3)
    config.checkpoint_every_steps = 200
    return config
