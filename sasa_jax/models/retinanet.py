"""RetinaNet: a classification ResNet's features, an FPN, and shared class and box heads."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.detection.anchors import AnchorSpec
from sasa_jax.models.fpn import FPN
from sasa_jax.models.heads import Head, class_prior_bias
from sasa_jax.models.projection import with_projection
from sasa_jax.models.spec import ModelSpec, build_model, spec_attention
from sasa_jax.nn import Norm

Array = jax.Array
# fpn_norm and head_residual: the attention parts only, every part, or none
WHERE = ("attention", "all", "none")
HEAD_KINDS = ("conv", "attention")


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """A RetinaNet: the backbone's ``ModelSpec`` (its classifier is not used), whether the
    FPN and heads are convolutions or SASA layers, and the pyramid's settings. ``heads`` sets
    both FPN and heads (Table 2's rows); ``fpn`` overrides it for the FPN alone, to tell
    which of the two an attention detector loses in (not a paper row)."""

    backbone: ModelSpec = ModelSpec()
    heads: str = "conv"
    fpn: str = ""  # "" (as heads), "conv" or "attention"
    num_classes: int = 80
    width: int = 256
    head_depth: int = 4
    p6_from: str = "p5"
    head_norm: bool = False  # batch norm after each head layer, per level (TPU RetinaNet)
    fpn_norm: str = "attention"  # batch norms in the FPN: "attention" (FPNs), "all", "none"
    attention_projection: bool = False  # W_O after each FPN/head SASA layer (projection.py)
    head_residual: str = "attention"  # head layers add their input: "attention", "all", "none"
    anchors: AnchorSpec = AnchorSpec()

    def normalised_fpn(self) -> bool:
        """Whether a batch norm follows each FPN layer: always for an attention FPN by default
        (a SASA layer's logits grow with the square of its input's scale; a convolution is
        linear in it, and the standard conv FPN has no norms)."""
        return self.fpn_norm == "all" or (
            self.fpn_norm == "attention" and self.resolved_fpn() != "conv"
        )

    def residual_heads(self) -> bool:
        """Whether each head layer adds its input back (``Head``'s ``residual``)."""
        return self.head_residual == "all" or (
            self.head_residual == "attention" and self.heads == "attention"
        )

    def resolved_fpn(self) -> str:
        """ "conv" or "attention": the FPN's spatial layers."""
        return self.fpn or self.heads

    def __post_init__(self):
        if self.heads not in HEAD_KINDS:
            raise ValueError(f"heads must be one of {HEAD_KINDS}, got {self.heads!r}")
        if self.fpn not in ("", *HEAD_KINDS):
            raise ValueError(f"fpn must be '' (as heads) or one of {HEAD_KINDS}, got {self.fpn!r}")
        if self.num_classes < 1 or self.width < 1:
            raise ValueError("a detector needs at least one class and a positive FPN width")
        if self.fpn_norm not in WHERE:
            raise ValueError(f"fpn_norm must be one of {WHERE}, got {self.fpn_norm!r}")
        if self.head_residual not in WHERE:
            raise ValueError(f"head_residual must be one of {WHERE}, got {self.head_residual!r}")
        if self.attention_projection and "attention" not in (self.heads, self.resolved_fpn()):
            raise ValueError(
                "attention_projection adds W_O to attention FPNs and heads: it needs "
                f"heads='attention' or fpn='attention', got heads={self.heads!r}, "
                f"fpn={self.fpn!r}"
            )
        if (self.anchors.min_level, self.anchors.max_level) != (3, 7):
            raise ValueError("the FPN makes levels P3-P7: AnchorSpec must use levels 3..7")


def _conv3x3_bias(in_features, out_features, *, strides, rngs, **dtypes):
    return nnx.Conv(
        in_features, out_features, (3, 3), strides=strides, padding="SAME", rngs=rngs, **dtypes
    )


def _spatial(spec: DetectorSpec, kind: str, dtypes: dict[str, Any]):
    """The FPN's or heads' spatial layer (``kind``): a 3x3 convolution with bias, or the
    backbone spec's SASA layer (then ``W_O`` with ``attention_projection``)."""
    if kind == "conv":
        return functools.partial(_conv3x3_bias, **dtypes)
    attention = spec_attention(spec.backbone, **dtypes)
    return with_projection(attention, **dtypes) if spec.attention_projection else attention


class RetinaNet(nnx.Module):
    """``[b, h, w, 3] -> (class logits [b, N, classes], box deltas [b, N, 4])``, N anchors
    in ``anchor_boxes``'s order (level, then position, then anchor)."""

    def __init__(
        self,
        spec: DetectorSpec,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        batch_norm: type[nnx.BatchNorm] = nnx.BatchNorm,
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        backbone = dataclasses.replace(spec.backbone, num_classes=0)  # no classifier
        self.backbone = build_model(backbone, rngs=rngs, batch_norm=batch_norm, **dtypes)
        widths = [stage[-1].conv3.out_features for stage in self.backbone.stages]
        norm = Norm(
            spec.backbone.bn_momentum, spec.backbone.bn_epsilon, dtype, param_dtype, batch_norm
        )
        self.fpn = FPN(
            tuple(widths[1:]),
            spatial=_spatial(spec, spec.resolved_fpn(), dtypes),
            width=spec.width,
            p6_from=spec.p6_from,
            norm=norm if spec.normalised_fpn() else None,
            rngs=rngs,
            **dtypes,
        )
        head = functools.partial(
            Head,
            spec.width,
            spec.anchors.per_position,
            spatial=_spatial(spec, spec.heads, dtypes),
            pointwise_output=spec.heads == "attention",
            depth=spec.head_depth,
            norm=norm if spec.head_norm else None,
            residual=spec.residual_heads(),
            rngs=rngs,
            **dtypes,
        )
        self.class_head = head(spec.num_classes, bias=class_prior_bias(0.01))
        self.box_head = head(4)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        pyramid = self.fpn(self.backbone.features(x))
        levels = [pyramid[f"p{level}"] for level in range(3, 8)]
        logits = jnp.concatenate([self.class_head(p, i) for i, p in enumerate(levels)], axis=1)
        boxes = jnp.concatenate([self.box_head(p, i) for i, p in enumerate(levels)], axis=1)
        return logits.astype(jnp.float32), boxes.astype(jnp.float32)
