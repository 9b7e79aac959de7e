"""Models (layer 3): the attention ResNets of Tables 1 and 3-7 (``ModelSpec`` -> ``build_model``)
and RetinaNet's FPN and heads on them (Table 2: ``DetectorSpec`` -> ``RetinaNet``). Models know
nothing of training or data."""

from sasa_jax.models.resnet import (
    EXPANSION,
    STAGE_WIDTHS,
    AttentionStem,
    Bottleneck,
    ConvStem,
    PatchStem,
    ResNet,
    attention,
)
from sasa_jax.models.retinanet import DetectorSpec, RetinaNet
from sasa_jax.models.spec import STAGE_SIZES, VARIANTS, ModelSpec, build_model, spec_attention

__all__ = [
    "EXPANSION",
    "STAGE_SIZES",
    "STAGE_WIDTHS",
    "VARIANTS",
    "AttentionStem",
    "Bottleneck",
    "ConvStem",
    "DetectorSpec",
    "ModelSpec",
    "PatchStem",
    "ResNet",
    "RetinaNet",
    "attention",
    "build_model",
    "spec_attention",
]
