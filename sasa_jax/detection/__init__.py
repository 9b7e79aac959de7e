"""Object detection (RetinaNet, the paper's Table 2): anchors, box coding, anchor matching,
losses and batch targets (``targets.py``), static-shape NMS and post-processing
(``postprocess.py``), the FPN and heads (``fpn.py``, ``heads.py``; ``projection.py``: their
optional W_O), the model (``retinanet.py``), COCO metrics (``coco_eval.py``), the trainer's
task (``task.py``), params and FLOPs (``summary.py``) and pictures (``visualize.py``). Its
data are in ``sasa_jax.data`` (``digit_scenes``, ``coco_folder``, ``detection_builders``,
``detection_preprocess``)."""

from sasa_jax.detection.anchors import AnchorSpec, anchor_boxes
from sasa_jax.detection.boxes import decode, encode, pairwise_iou
from sasa_jax.detection.losses import box_loss, focal_loss
from sasa_jax.detection.matching import IGNORE, NEGATIVE, match_anchors
from sasa_jax.detection.nms import non_max_suppression

__all__ = [
    "IGNORE",
    "NEGATIVE",
    "AnchorSpec",
    "anchor_boxes",
    "box_loss",
    "decode",
    "encode",
    "focal_loss",
    "match_anchors",
    "non_max_suppression",
    "pairwise_iou",
]
