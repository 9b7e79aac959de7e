r"""The bundled offline dataset: scikit-learn's handwritten digits, 32x32, 10 classes.

The README's main job. It builds the dataset offline on first use and trains a small attention
ResNet (ResNet-26 layout, widths x0.25, attention in every stage, 5x5 windows):

  python train.py --config=configs/digits.py --workdir=/tmp/sasa_digits

Expect about 0.98-0.99 test top-1 (the last eval_top1 in metrics.jsonl; 0.983, 0.986 and
0.981 for seeds 0, 1, 2) in about a minute on a 2-core CPU, from an empty TFDS data dir
(measured 2026-12-04 by benchmarks/results_rows.py; the README's results table). The
argument selects model fields like configs/imagenet.py, e.g.
--config=configs/digits.py:variant=baseline.
"""

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.default_config()
    config.dataset = "digits"
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 120
    config.num_epochs = 20
    config.warmup_epochs = 1
    config.base_learning_rate = 0.4  # 0.1 at batch 64
    config.weight_decay = 5e-5
    config.label_smoothing = 0.1
    config.crop_area_min = 0.6
    config.crop_ratio_min = 0.8
    config.crop_ratio_max = 1.25
    config.random_flip = False  # a mirrored digit is another glyph
    config.eval_crop_fraction = 1.0
    config.log_every_steps = 20
    config.eval_every_steps = -1  # every epoch
    config.checkpoint_every_steps = 100
    config_lib.small_model(config)
    config.model.num_classes = 10
    return config_lib.apply_model_arg(config, arg)
