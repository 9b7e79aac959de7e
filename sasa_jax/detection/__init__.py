"""Object detection (RetinaNet, the paper's Table 2): anchors, box coding, anchor matching,
losses and batch targets (``targets.py``), static-shape NMS and post-processing
(``postprocess.py``), the FPN and heads (``fpn.py``, ``heads.py``) and the model
(``retinanet.py``). Its data, training, eval and summary are not built yet."""

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
