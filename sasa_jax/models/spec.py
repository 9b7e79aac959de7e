"""What selects a model: ``ModelSpec`` (the config's ``model`` fields, checked when made) and
``build_model``, which turns one into a ResNet (Table 1's variants, Table 3's stage choice,
Tables 4-7's attention settings, Fig. 5's widths)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sasa_jax.models.resnet import (
    STAGE_WIDTHS,
    STEM_POOLS,
    AttentionStem,
    ConvStem,
    PatchStem,
    ResNet,
    SpatialFactory,
    _scaled,
    attention,
)
from sasa_jax.nn import STEM_VALUES, Norm, conv3x3

STAGE_SIZES = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


VARIANTS = {
    # name: (stem, attention stages)
    "baseline": ("conv", ()),
    "conv_stem_attention": ("conv", (1, 2, 3, 4)),
    "full_attention": ("attention", (1, 2, 3, 4)),
}

# "patch": a block x block stride-block conv (models.PatchStem), not a paper variant
STEMS = ("conv", "attention", "patch")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that selects a model; ``from_config`` reads it from ``config.model``.
    A spec is checked once, when it is made: a bad one raises ValueError."""

    depth: int = 50
    variant: str = "baseline"
    stem: str = ""  # "", "conv", "attention" or "patch" ("" = as the variant says)
    attention_stages: str = "variant"  # e.g. "234", "none", or "variant"
    stem_values: str = "spatially_aware"
    window: int = 7
    num_heads: int = 8
    positional: str = "relative"
    logits: str = "qk+qr"
    border: str = "mask"
    implementation: str = "auto"
    width_multiplier: float = 1.0
    num_classes: int = 1000
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True
    stem_block: int = 4
    stem_mixtures: int = 4  # M of the spatially-aware values (not stated in the paper)
    stem_zero_query: bool = True  # the stem's W_Q starts at zero: block-uniform weights at init
    # > 0: not the paper's stem; the conv stem's geometry with a stem_window x stem_window
    # stride-2 attention for its conv (models.AttentionStem); spatially-aware values only
    stem_window: int = 0
    # > 0: the patch stem's kernel (0: stem_block, non-overlapping tiles); larger overlaps its
    # neighbours' windows at the same stride (not in the paper: a control for the tiles)
    stem_patch_kernel: int = 0
    # the conv stem's 3x3 stride-2 pool: "max" (the paper's) or "avg" (not in the paper: a
    # control for what the max pool gives the conv stem)
    stem_pool: str = "max"
    # recompute the stem's forward in the backward pass instead of keeping its full-resolution
    # activations: less accelerator memory, one more forward of the stem (docs/performance.md)
    stem_remat: bool = False

    @classmethod
    def from_config(cls, model_config: Any, **overrides) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(model_config).items() if k in fields}
        unknown = set(dict(model_config)) - fields
        if unknown:
            raise ValueError(
                f"unknown model config fields {sorted(unknown)}; known: {sorted(fields)}"
            )
        return cls(**{**values, **overrides})

    def __post_init__(self):
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"model.depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        if self.variant not in VARIANTS:
            raise ValueError(
                f"model.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}"
            )
        if self.stem_values not in STEM_VALUES:
            raise ValueError(
                f"model.stem_values must be one of {STEM_VALUES}, got {self.stem_values!r}"
            )
        if self.resolved_stem() not in STEMS:
            raise ValueError(f"model.stem must be one of {STEMS}, got {self.stem!r}")
        self._check_stem_window()
        self._check_stem_patch_kernel()
        self._check_stem_pool()
        for stage in self.resolved_attention_stages():
            width = _scaled(STAGE_WIDTHS[stage - 1], self.width_multiplier)
            if width % self.num_heads or (width // self.num_heads) % 2:
                raise ValueError(
                    f"stage {stage} width {width} must split into num_heads={self.num_heads} "
                    "heads of even size"
                )
        _scaled(64, self.width_multiplier)

    def _check_stem_patch_kernel(self) -> None:
        if self.stem_patch_kernel and self.resolved_stem() != "patch":
            raise ValueError(
                f"model.stem_patch_kernel={self.stem_patch_kernel} applies to the patch stem, "
                f"but this model's stem is {self.resolved_stem()!r}: use stem='patch', or "
                "stem_patch_kernel=0"
            )
        if self.stem_patch_kernel and self.stem_patch_kernel < self.stem_block:
            raise ValueError(
                f"model.stem_patch_kernel must be 0 or >= stem_block ({self.stem_block}), got "
                f"{self.stem_patch_kernel}"
            )

    def _check_stem_pool(self) -> None:
        if self.stem_pool not in STEM_POOLS:
            raise ValueError(f"model.stem_pool must be one of {STEM_POOLS}, got {self.stem_pool!r}")
        if self.stem_pool != "max" and self.resolved_stem() != "conv":
            raise ValueError(
                f"model.stem_pool={self.stem_pool!r} applies to the conv stem, but this model's "
                f"stem is {self.resolved_stem()!r}: use stem='conv', or stem_pool='max'"
            )

    def _check_stem_window(self) -> None:
        if self.stem_window < 0:
            raise ValueError(
                f"model.stem_window must be >= 0 (0: the paper's blocks), got {self.stem_window}"
            )
        if self.stem_window and self.stem_values != "spatially_aware":
            raise ValueError(
                "model.stem_window > 0 (a sliding-window stem) has spatially-aware values only; "
                f"got model.stem_values={self.stem_values!r}: set stem_window=0 or "
                "stem_values='spatially_aware'"
            )
        if self.stem_window and self.resolved_stem() != "attention":
            raise ValueError(
                f"model.stem_window={self.stem_window} applies to the attention stem, but this "
                f"model's stem is {self.resolved_stem()!r}: use variant=full_attention or "
                "stem='attention', or stem_window=0"
            )

    def resolved_stem(self) -> str:
        """ "conv", "attention" or "patch": the stem this spec builds."""
        return self.stem or VARIANTS[self.variant][0]

    def resolved_attention_stages(self) -> tuple[int, ...]:
        """The stages (1-4) whose 3x3 convolutions are attention."""
        text = str(self.attention_stages).strip().lower()
        if text == "variant":
            return VARIANTS[self.variant][1]
        if text in ("", "none", "-"):
            return ()
        if not text.isdigit() or not set(text) <= set("1234"):
            raise ValueError(
                "model.attention_stages must be digits from 1234 (e.g. '234'), 'none' or "
                f"'variant', got {self.attention_stages!r}"
            )
        return tuple(sorted({int(c) for c in text}))


def spec_attention(spec: ModelSpec, **dtypes: Any) -> SpatialFactory:
    """The factory of the SASA layers ``spec`` describes (window, heads, logits, ...)."""
    return attention(
        window=spec.window,
        num_heads=spec.num_heads,
        positional=spec.positional,
        logits=spec.logits,
        border=spec.border,
        implementation=spec.implementation,
        **dtypes,
    )


def build_model(
    spec: ModelSpec,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    batch_norm: type[nnx.BatchNorm] = nnx.BatchNorm,
) -> ResNet:
    """The ResNet a ``ModelSpec`` names, with ``batch_norm`` as every norm's class."""
    norm = Norm(spec.bn_momentum, spec.bn_epsilon, dtype, param_dtype, batch_norm)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    attention_stages = spec.resolved_attention_stages()
    sasa = spec_attention(spec, **dtypes)
    conv = functools.partial(conv3x3, **dtypes)
    spatial = [sasa if stage in attention_stages else conv for stage in (1, 2, 3, 4)]
    if spec.resolved_stem() == "attention":
        stem = functools.partial(
            AttentionStem,
            norm=norm,
            block=spec.stem_block,
            values=spec.stem_values,
            num_mixtures=spec.stem_mixtures,
            zero_query=spec.stem_zero_query,
            window=spec.stem_window,
            implementation=spec.implementation,
            **dtypes,
        )
    elif spec.resolved_stem() == "patch":
        stem = functools.partial(
            PatchStem, norm=norm, block=spec.stem_block, kernel=spec.stem_patch_kernel
        )
    else:
        stem = functools.partial(ConvStem, norm=norm, pool=spec.stem_pool)
    return ResNet(
        STAGE_SIZES[spec.depth],
        spatial=spatial,
        stem=stem,
        num_classes=spec.num_classes,
        width_multiplier=spec.width_multiplier,
        norm=norm,
        zero_init_residual=spec.zero_init_residual,
        remat_stem=spec.stem_remat,
        rngs=rngs,
    )


__all__ = ["STAGE_SIZES", "VARIANTS", "ModelSpec", "build_model", "spec_attention"]
