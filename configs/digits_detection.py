r"""The bundled offline detection set: scikit-learn's digits on 96-128 px scenes, 10 classes.

The detection quick start. It builds the scenes offline on first use (2,500 train, 500 test)
and trains a small RetinaNet: a ResNet-26 backbone at widths x0.25 with attention in every
stage (conv stem), and a conv FPN and heads of 64 channels (Table 2's "attention backbone,
conv FPN and heads" row; with heads=attention the same run reaches AP 0.51, see
docs/attention_at_small_scale.md):

  python train.py --config=configs/digits_detection.py --workdir=/tmp/sasa_digit_scenes

Expect COCO AP (the last eval_ap in metrics.jsonl) of about 0.6 in about 14
minutes on a 2-core CPU, from an empty TFDS data dir (measured 2026-12-03: AP 0.599 in
824 s; the README's results table). The recipe: AdamW, anchors twice the stride and forced
matches; docs/detection.md says why. The argument selects model and detection
fields as for configs/coco.py, e.g. --config=configs/digits_detection.py:heads=attention.
"""

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.detection_config()
    config.dataset = "digit_scenes"
    config.image_size = 96  # the scenes' longer side (96-128 px) is resized to 96
    config.batch_size = 32
    config.eval_batch_size = 100
    config.num_epochs = 24
    config.warmup_epochs = 1
    config.optimizer = "adamw"  # learns these scenes faster than SGD in a run this short
    config.base_learning_rate = 0.016  # 2e-3 at batch 32
    config.weight_decay = 0.05  # decoupled: each step shrinks weights by lr * 0.05
    config.random_flip = False  # a mirrored digit is another glyph
    config.log_every_steps = 20
    config.eval_every_steps = 468  # every 6 epochs
    config.checkpoint_every_steps = 100
    config_lib.small_model(config)
    config.model.num_classes = 10
    config.detection.heads = "conv"
    config.detection.fpn_width = 64
    # 16-25 px anchors at P3: twice the stride, so most digits overlap an anchor at IoU 0.5
    # wherever they lie; forcing gives the smaller ones their best anchor (docs/detection.md)
    config.detection.anchor_size = 2.0
    config.detection.force_match = True
    config.detection.max_boxes = 8
    config.detection.scale_min = 0.75
    config.detection.scale_max = 1.25
    return config_lib.apply_detection_arg(config, arg)
