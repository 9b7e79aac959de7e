r"""Your own detection data in a COCO-format folder: the argument is the folder.

  DIR/annotations/instances_{train,val}.json    DIR/{train,val}/*.jpg|png  (or train2017/...)

The image size, the anchor size and the number of objects kept per image follow from the
folder's training annotations (``sasa_jax.data.coco_folder.folder_statistics``): the input
side is the 90th percentile of the images' longer sides rounded up to a multiple of 32, and
the smallest anchors (at P3) match the 5th percentile of the objects' sizes, but are at least
twice the stride (16 px), with each object also matched to its best anchor (``force_match``):
anchors the size of objects near the stride reach IoU 0.5 with few of them (docs/detection.md).
Override any of them: ``--config=configs/coco_folder.py:DIR,anchor_size=3`` or
``--config.image_size=256``. The classes are the JSON's categories. Model and detection fields
follow DIR as for configs/coco.py (``DIR,variant=baseline,heads=conv``).

  python benchmarks/make_coco_folder.py --out /tmp/shapes_coco   # 640 + 160 images, 3 kinds
  python train.py --config=configs/coco_folder.py:/tmp/shapes_coco --workdir=/tmp/wd_shapes

On that folder, measured on a 2-core CPU from an empty TFDS dir (2026-12-03): AP 0.641, AP50
0.926 after 700 steps in 460 s (the README's results table).
"""

from sasa_jax.data.coco_folder import folder_statistics
from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    folder, rest = config_lib.split_path_arg(arg)
    if not folder:
        raise ValueError("give the folder: --config=configs/coco_folder.py:/path/to/folder")
    stats = folder_statistics(folder)
    config = config_lib.detection_config()
    config.dataset = "coco_folder"
    config.coco_folder = folder
    config.image_size = stats["image_size"]
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_epochs = 35
    config.warmup_epochs = 1
    config.optimizer = "adamw"  # learns faster than SGD in runs this short
    config.base_learning_rate = 0.016  # 2e-3 at batch 32
    config.weight_decay = 0.05  # decoupled
    config.random_flip = True
    config.log_every_steps = 20
    config.eval_every_steps = 5 * max(1, stats["train_images"] // config.batch_size)
    config.checkpoint_every_steps = 200
    config_lib.small_model(config)
    config.model.num_classes = stats["num_classes"]
    config.detection.heads = "conv"
    config.detection.fpn_width = 64
    scale = config.image_size / stats["image_size"]  # images are resized to the input side
    config.detection.anchor_size = min(4.0, max(2.0, stats["small_object"] * scale / 8))
    config.detection.force_match = True
    config.detection.max_boxes = stats["max_objects"]
    return config_lib.apply_detection_arg(config, rest)
