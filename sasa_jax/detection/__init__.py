"""Object detection (RetinaNet, the paper's Table 2): anchors, box coding, anchor matching,
losses and static-shape post-processing. The detector, its data and its training build on
these (work in progress: the modules here are the pieces with no model in them)."""

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
