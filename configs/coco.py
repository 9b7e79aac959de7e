r"""COCO 2017 detection with RetinaNet: the paper's recipe for Table 2.

Prepare COCO once (needs TensorFlow, ~25 GB): pip install -e ".[coco]" and
``tfds build coco/2017 --file_format=array_record``. Then:

  python train.py --config=configs/coco.py:variant=full_attention,heads=attention --workdir=DIR
  python -m sasa_jax.summary --config=configs/coco.py:variant=full_attention,heads=attention

The argument selects the backbone (``variant``, ``depth``, ``width``, any model field) and the
FPN and heads (``heads=conv|attention``, ``p6_from=p5|c5``, any ``config.detection`` field).
Recipe: batch 64, 150 epochs, learning rate warmed up to 0.12 over 1 epoch then cosine,
640x640 crops after multiscale jitter (0.8-1.2), horizontal flips; eval resizes the longer
side to 640. The paper reports 36.5 mAP for both the ResNet-50 baseline and the full-attention
model; not measured here (no COCO and no accelerator on this machine). Expect several days on
8 accelerators.
"""

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.detection_config()
    config.dataset = "coco"
    config.image_size = 640
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = 150
    config.warmup_epochs = 1
    config.base_learning_rate = 0.48  # 0.12 at batch 64
    config.weight_decay = 1e-4
    config.random_flip = True
    config.log_every_steps = 100
    config.eval_every_steps = 10 * 1848  # every 10 epochs (1,848 steps per epoch)
    config.checkpoint_every_steps = 1000
    config.model.depth = 50
    config.model.variant = "baseline"
    config.model.num_classes = 80
    config.detection.heads = "conv"
    return config_lib.apply_detection_arg(config, arg)
