r"""Cluttered digits: the bundled harder dataset, for ablations (48x48, 10 classes).

One of scikit-learn's digits, scaled up to 20-34 px at a random position among 4-8 clutter
fragments cut from other digits (sasa_jax/data/digits_clutter.py); 5,748 train and 1,440
test images, built offline on first use. It trains the same small attention ResNet as
configs/digits.py (ResNet-26 layout, widths x0.25, attention in every stage, 5x5 windows):

  python train.py --config=configs/digits_clutter.py --workdir=/tmp/sasa_clutter

Expect a test top-1 (the last eval_top1 in metrics.jsonl) of about 0.93 (measured 2026-12-06
at 998e745 on a 2-core Xeon: 0.933; seeds 1-4: 0.922, 0.935, 0.931, 0.920) in about 10
minutes, from an empty TFDS data dir; the README's results table. 80 epochs is the length at
which the attention stem (variant=full_attention) comes within a point of the conv stem: at
10 epochs both are still learning, the attention stem far behind
(docs/attention_at_small_scale.md). The argument selects model fields like
configs/imagenet.py, e.g. --config=configs/digits_clutter.py:variant=baseline.
docs/ablations.md sweeps them with python -m sasa_jax.sweep (Tables 3-6 with
--config.num_epochs=10, a short schedule for quick comparisons; Table 7 at both lengths).
"""

import pathlib

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    """configs/digits.py's model and recipe, on the cluttered digits at 48x48."""
    config = config_lib.from_file(pathlib.Path(__file__).with_name("digits.py"), arg)
    config.dataset = "digits_clutter"
    config.image_size = 48
    # Both stems converge (train top-1 above 99%); --config.num_epochs=10 is the short schedule.
    config.num_epochs = 80
    config.crop_area_min = 0.85  # smaller crops can cut the digit off
    config.crop_ratio_min = 0.9
    config.crop_ratio_max = 1.1
    # Grey digits on black: the pixels are scaled, not centred, so black stays 0 (ImageNet's
    # mean and std put it at -2.1). Worth 2 points to the conv stem and 6 to the paper's
    # attention stem at 10 epochs, 0.2 and 1.1 at 80 (docs/attention_at_small_scale.md).
    config.pixel_mean = (0.0, 0.0, 0.0)
    config.pixel_std = (0.3, 0.3, 0.3)
    config.checkpoint_every_steps = 200
    return config
