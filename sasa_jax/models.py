"""NNX ResNets (v1.5 bottleneck) whose spatial op is injected per stage.

A spatial op is any callable ``factory(in_features, out_features, *, strides, rngs)`` that
returns a module mapping ``[b, h, w, in] -> [b, h/strides, w/strides, out]``: a 3x3 convolution
(``conv3x3``) or the SASA layer (``attention(...)``). The stem (``ConvStem`` or
``AttentionStem``) and the batch norm (``Norm.layer``: ``nnx.BatchNorm`` unless the caller
injects another, as the trainer does for device-ordered statistics) are injected the same
way. Models know nothing of training; ``build_model`` turns a ``ModelSpec`` into a module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.layers import STEM_VALUES, SelfAttention2D, StemAttention

Array = jax.Array
SpatialFactory = Callable[..., nnx.Module]

STAGE_SIZES = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
VARIANTS = {
    # name: (stem, attention stages)
    "baseline": ("conv", ()),
    "conv_stem_attention": ("conv", (1, 2, 3, 4)),
    "full_attention": ("attention", (1, 2, 3, 4)),
}


@dataclasses.dataclass(frozen=True)
class Norm:
    """Batch-norm settings shared by every norm of a model; ``layer`` is the batch-norm class
    (any ``nnx.BatchNorm`` subclass)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    layer: type[nnx.BatchNorm] = nnx.BatchNorm

    def __call__(self, features: int, *, rngs: nnx.Rngs, zero_scale: bool = False):
        init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
        return self.layer(
            features,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=init,
            rngs=rngs,
        )


def conv3x3(
    in_features: int,
    out_features: int,
    *,
    strides: int = 1,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Conv:
    """The 3x3 convolution of a standard bottleneck (bias-free, SAME)."""
    return nnx.Conv(
        in_features,
        out_features,
        (3, 3),
        strides=strides,
        padding="SAME",
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Conv1x1(nnx.Conv):
    """A 1x1 "SAME" ``nnx.Conv`` (the same parameters) applied as one 2-D matmul.

    XLA's CPU backend runs a 1x1 convolution several times slower than the equivalent
    ``[pixels, in] @ [in, out]`` matmul (benchmarks/models.py). A stride ``s`` reads every
    ``s``-th pixel, as the convolution does. ``[b, h, w, in] -> [b, h/s, w/s, out]``.
    """

    def __init__(self, in_features: int, out_features: int, *, strides: int = 1, **kwargs):
        super().__init__(
            in_features, out_features, (1, 1), strides=strides, padding="SAME", **kwargs
        )
        if self.mask is not None or self.feature_group_count != 1:
            raise ValueError("Conv1x1 takes no mask and no feature groups")

    def __call__(self, x: Array) -> Array:
        x = subsample(x, self.strides)
        kernel = self.kernel[...].reshape(self.in_features, self.out_features)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = jnp.dot(
            x.reshape(-1, self.in_features),
            kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)


def subsample(x: Array, step: int) -> Array:
    """Every ``step``-th pixel of ``[b, h, w, c]`` from the first: ``x[:, ::step, ::step]``,
    as a reshape and an index (XLA's GPU Triton GEMM fusion aborts the process on the strided
    slice feeding a matmul's gradient)."""
    if step == 1:
        return x
    b, h, w, c = x.shape
    x = jnp.pad(x, [(0, 0), (0, -h % step), (0, -w % step), (0, 0)])
    return x.reshape(b, x.shape[1] // step, step, x.shape[2] // step, step, c)[:, :, 0, :, 0]


def attention(**layer_kwargs) -> SpatialFactory:
    """A spatial factory of SASA layers; ``layer_kwargs`` go to ``SelfAttention2D``."""
    return functools.partial(SelfAttention2D, **layer_kwargs)


class ConvStem(nnx.Module):
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool: ``[b,224,224,3] -> [b,56,56,w]``."""

    def __init__(
        self, in_features: int = 3, out_features: int = 64, *, norm: Norm = Norm(), rngs: nnx.Rngs
    ):
        self.in_features, self.out_features = in_features, out_features
        self.conv = nnx.Conv(
            in_features,
            out_features,
            (7, 7),
            strides=2,
            padding=[(3, 3)] * 2,
            use_bias=False,
            dtype=norm.dtype,
            param_dtype=norm.param_dtype,
            rngs=rngs,
        )
        self.norm = norm(out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.norm(self.conv(x)))
        return nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def block_max(x: Array, block: int) -> Array:
    """Max pool over non-overlapping ``block x block`` tiles of ``[b, H, W, c]`` (H and W
    multiples of ``block``): ``nnx.max_pool`` with stride = window, lowered per platform. On
    CPU and GPU as a reshape and a max, whose gradient is one elementwise mask: ``max_pool``'s
    goes through a variadic reduce-window over four index planes of the input's size, which
    took ~300 ms of a full-attention ResNet-50 step at 224x224 on a 2-core CPU
    (benchmarks/models.py) and 0.04 GB more of a ResNet-26's step on an H100 (128x128, batch
    8). On TPU ``max_pool`` itself: there the reshape's 6-D gradient is laid out with its
    channels split and padded 8x (0.3 GB more of the same step on a v5e)."""

    def by_reshape(x):
        b, h, w, c = x.shape
        return x.reshape(b, h // block, block, w // block, block, c).max(axis=(2, 4))

    def by_pool(x):
        return nnx.max_pool(x, (block, block), strides=(block, block))

    return jax.lax.platform_dependent(x, tpu=by_pool, default=by_reshape)


class AttentionStem(nnx.Module):
    """The attention stem: ``StemAttention`` (attention in each block x block tile with
    spatially-aware values), batch norm, ReLU and a block x block max pool:
    ``[b, 224, 224, 3] -> [b, 56, 56, 64]``. The paper names the norm and the pool; the ReLU
    between them is our choice, as in the conv stem. ``attention_kwargs`` go to
    ``StemAttention`` (block, values, heads, implementation, dtypes)."""

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        norm: Norm = Norm(),
        rngs: nnx.Rngs,
        **attention_kwargs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.attention = StemAttention(in_features, out_features, rngs=rngs, **attention_kwargs)
        self.block = self.attention.block
        self.norm = norm(out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.norm(self.attention(x)))
        return block_max(y, self.block)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: 1x1, spatial op (carries the stride), 1x1 (x4), + shortcut."""

    def __init__(
        self,
        in_features: int,
        width: int,
        *,
        strides: int,
        spatial: SpatialFactory,
        norm: Norm,
        zero_init_residual: bool,
        rngs: nnx.Rngs,
    ):
        out = width * EXPANSION
        dtypes = dict(dtype=norm.dtype, param_dtype=norm.param_dtype)
        self.strides = strides
        self.conv1 = Conv1x1(in_features, width, use_bias=False, rngs=rngs, **dtypes)
        self.norm1 = norm(width, rngs=rngs)
        self.spatial = spatial(width, width, strides=strides, rngs=rngs)
        self.norm2 = norm(width, rngs=rngs)
        self.conv3 = Conv1x1(width, out, use_bias=False, rngs=rngs, **dtypes)
        self.norm3 = norm(out, rngs=rngs, zero_scale=zero_init_residual)
        if strides != 1 or in_features != out:
            self.shortcut = Conv1x1(
                in_features, out, strides=strides, use_bias=False, rngs=rngs, **dtypes
            )
            self.shortcut_norm = norm(out, rngs=rngs)
        else:
            self.shortcut = self.shortcut_norm = None

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = nnx.relu(self.norm2(self.spatial(y)))
        y = self.norm3(self.conv3(y))
        residual = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        return nnx.relu(y + residual)


class ResNet(nnx.Module):
    """A bottleneck ResNet with an injected stem and one spatial factory per stage.

    Args:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      spatial: one spatial factory per stage (``conv3x3`` or ``attention(...)``).
      stem: factory ``stem(in_features, out_features, *, rngs)``.
      num_classes: classifier outputs; 0 builds no classifier (a detection backbone: only
        ``features`` then).
      width_multiplier: scales the stem and stage widths (64, 128, 256, 512), as in Fig. 5.
      norm: batch-norm settings and the compute/parameter dtypes.
      zero_init_residual: zero-init the last BN scale of each block.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        *,
        spatial: Sequence[SpatialFactory],
        stem: Callable[..., nnx.Module],
        num_classes: int = 1000,
        width_multiplier: float = 1.0,
        in_features: int = 3,
        norm: Norm = Norm(),
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
    ):
        if len(spatial) != len(stage_sizes):
            raise ValueError(
                f"need one spatial factory per stage ({len(stage_sizes)}), got {len(spatial)}"
            )
        widths = [_scaled(w, width_multiplier) for w in STAGE_WIDTHS[: len(stage_sizes)]]
        self.stem = stem(in_features, _scaled(64, width_multiplier), rngs=rngs)
        features = self.stem.out_features
        self.stages = nnx.List()
        for index, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            stage = nnx.List()
            for block in range(blocks):
                strides = 2 if index > 0 and block == 0 else 1
                stage.append(
                    Bottleneck(
                        features,
                        width,
                        strides=strides,
                        spatial=spatial[index],
                        norm=norm,
                        zero_init_residual=zero_init_residual,
                        rngs=rngs,
                    )
                )
                features = width * EXPANSION
            self.stages.append(stage)
        self.num_features = features
        self.head = (
            nnx.Linear(
                features, num_classes, dtype=norm.dtype, param_dtype=norm.param_dtype, rngs=rngs
            )
            if num_classes
            else None
        )

    def features(self, x: Array) -> dict[str, Array]:
        """Multi-scale features for detection: outputs of stages 2-5 (``c2``..``c5``),
        at strides 4, 8, 16 and 32."""
        y = self.stem(x)
        out = {}
        for index, stage in enumerate(self.stages):
            for block in stage:
                y = block(y)
            out[f"c{index + 2}"] = y
        return out

    def __call__(self, x: Array) -> Array:
        """``x: [batch, height, width, 3] -> logits [batch, num_classes]`` (float32)."""
        if self.head is None:
            raise ValueError("this ResNet was built without a classifier (num_classes=0)")
        y = self.features(x)[f"c{len(self.stages) + 1}"]
        return self.head(jnp.mean(y, axis=(1, 2))).astype(jnp.float32)


def _scaled(width: int, multiplier: float) -> int:
    scaled = width * multiplier
    if scaled != int(scaled) or scaled < 1:
        raise ValueError(
            f"width_multiplier {multiplier} gives a non-integer width {scaled} "
            f"for base width {width}"
        )
    return int(scaled)


# ------------------------------------------------------------------ building from a config


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that selects a model; ``from_config`` reads it from ``config.model``.
    A spec is checked once, when it is made: a bad one raises ValueError."""

    depth: int = 50
    variant: str = "baseline"
    stem: str = ""  # "", "conv" or "attention" ("" = as the variant says)
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
        if self.resolved_stem() not in ("conv", "attention"):
            raise ValueError(f"model.stem must be 'conv' or 'attention', got {self.stem!r}")
        for stage in self.resolved_attention_stages():
            width = _scaled(STAGE_WIDTHS[stage - 1], self.width_multiplier)
            if width % self.num_heads or (width // self.num_heads) % 2:
                raise ValueError(
                    f"stage {stage} width {width} must split into num_heads={self.num_heads} "
                    "heads of even size"
                )
        _scaled(64, self.width_multiplier)

    def resolved_stem(self) -> str:
        """ "conv" or "attention": the stem this spec builds."""
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
            implementation=spec.implementation,
            **dtypes,
        )
    else:
        stem = functools.partial(ConvStem, norm=norm)
    return ResNet(
        STAGE_SIZES[spec.depth],
        spatial=spatial,
        stem=stem,
        num_classes=spec.num_classes,
        width_multiplier=spec.width_multiplier,
        norm=norm,
        zero_init_residual=spec.zero_init_residual,
        rngs=rngs,
    )
