r"""The bundled offline detection set: scikit-learn's digits on 96-128 px scenes, 10 classes.

The detection quick start. It builds the scenes offline on first use (2,500 train, 500 test)
and trains a small RetinaNet: a ResNet-26 backbone at widths x0.25 with attention in every
stage (conv stem), and a conv FPN and heads of 64 channels (Table 2's "attention backbone,
conv FPN and heads" row; attention FPN and heads learn more slowly in runs this short, see
docs/detection.md):

  python train.py --config=configs/digits_detection.py --workdir=/tmp/sasa_digit_scenes

Expect COCO AP (the last eval_ap in metrics.jsonl) of about 0.05 (AP50 0.12) in about 9
minutes on a 2-core CPU, from an empty TFDS data dir (measured: 0.054 in 518 s; the README's
results table). That is far below a useful detector: 468 steps from scratch are too few here
(docs/detection.md). The argument selects model
and detection fields as for configs/coco.py, e.g.
--config=configs/digits_detection.py:heads=attention.
"""

from sasa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.detection_config()
    config.dataset = "digit_scenes"
    config.image_size = 96  # the scenes' longer side (96-128 px) is resized to 96
    config.batch_size = 32
    config.eval_batch_size = 100
    config.num_epochs = 6
    config.warmup_epochs = 1
    config.base_learning_rate = 0.48  # 0.06 at batch 32
    config.weight_decay = 5e-5
    config.random_flip = False  # a mirrored digit is another glyph
    config.log_every_steps = 20
    config.eval_every_steps = 156  # every 2 epochs
    config.checkpoint_every_steps = 100
    config.model.depth = 26
    config.model.variant = "conv_stem_attention"
    config.model.width_multiplier = 0.25
    config.model.window = 5
    config.model.bn_momentum = 0.9
    config.model.num_classes = 10
    config.detection.heads = "conv"
    config.detection.fpn_width = 64
    config.detection.anchor_size = 1.125  # 9-14 px anchors at P3: the smallest digits
    config.detection.max_boxes = 8
    config.detection.scale_min = 0.75
    config.detection.scale_max = 1.25
    return config_lib.apply_detection_arg(config, arg)
