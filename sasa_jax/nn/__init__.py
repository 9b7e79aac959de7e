"""Flax NNX building blocks (layer 2): the SASA layer and the stem's attention, convolutions,
batch norm and pooling. No models, tasks, training or data here; the op below is
``sasa_jax.attention``."""

from sasa_jax.nn.attention import (
    LOGITS,
    POSITIONAL,
    STEM_VALUES,
    SelfAttention2D,
    relative_logit_maps,
    sinusoidal_2d,
)
from sasa_jax.nn.conv import Conv1x1, conv3x3, subsample
from sasa_jax.nn.norm import BatchNorm, Norm, set_batch_axis
from sasa_jax.nn.pool import block_max
from sasa_jax.nn.sliding_stem import SlidingStemAttention, image_windows
from sasa_jax.nn.stem_attention import StemAttention, attend_norm_pool

__all__ = [
    "LOGITS",
    "POSITIONAL",
    "STEM_VALUES",
    "BatchNorm",
    "Conv1x1",
    "Norm",
    "SelfAttention2D",
    "SlidingStemAttention",
    "StemAttention",
    "attend_norm_pool",
    "block_max",
    "conv3x3",
    "image_windows",
    "relative_logit_maps",
    "set_batch_axis",
    "sinusoidal_2d",
    "subsample",
]
