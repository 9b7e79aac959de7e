"""NNX ResNets (v1.5 bottleneck) whose spatial op is injected per stage.

A spatial op is any callable ``factory(in_features, out_features, *, strides, rngs)`` that
returns a module mapping ``[b, h, w, in] -> [b, h/strides, w/strides, out]``: a 3x3 convolution
(``conv3x3``) or the SASA layer (``attention(...)``). The stem (``ConvStem`` or
``AttentionStem``) and the batch norm (``Norm.layer``: ``nnx.BatchNorm`` unless the caller
injects another, as the trainer does for device-ordered statistics) are injected the same
way. Models know nothing of training; ``build_model`` turns a ``ModelSpec`` into a module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.nn import (
    Conv1x1,
    Norm,
    SelfAttention2D,
    SlidingStemAttention,
    StemAttention,
    attend_norm_pool,
)

Array = jax.Array
SpatialFactory = Callable[..., nnx.Module]

STAGE_WIDTHS = (64, 128, 256, 512)


EXPANSION = 4


def attention(**layer_kwargs) -> SpatialFactory:
    """A spatial factory of SASA layers; ``layer_kwargs`` go to ``SelfAttention2D``."""
    return functools.partial(SelfAttention2D, **layer_kwargs)


def _stem_conv(in_features, out_features, size, strides, padding, norm: Norm, rngs) -> nnx.Conv:
    """A stem's bias-free ``size x size`` conv in the norm's dtypes."""
    return nnx.Conv(
        in_features,
        out_features,
        (size, size),
        strides=strides,
        padding=padding,
        use_bias=False,
        dtype=norm.dtype,
        param_dtype=norm.param_dtype,
        rngs=rngs,
    )


# "max": the paper's (and ResNet's); "avg" (not in the paper; a control) averages each
# window's pixels inside the map
_POOLS = {"max": nnx.max_pool, "avg": functools.partial(nnx.avg_pool, count_include_pad=False)}
STEM_POOLS = tuple(_POOLS)


def check_stem_pool(kind: str) -> None:
    """ValueError unless ``kind`` names one of ``STEM_POOLS``."""
    if kind not in _POOLS:
        raise ValueError(f"the conv stem's pool must be one of {STEM_POOLS}, got {kind!r}")


def conv_stem_pool(x: Array, kind: str = "max") -> Array:
    """The conv stem's 3x3 stride-2 pool of kind ``kind`` (padding 1): ``[b, h, w, c] ->
    [b, h/2, w/2, c]`` (sizes rounded up)."""
    check_stem_pool(kind)
    return _POOLS[kind](x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ConvStem(nnx.Module):
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool: ``[b,224,224,3] -> [b,56,56,w]``.
    ``pool="avg"`` averages instead of taking the max (``conv_stem_pool``; not the paper's)."""

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        norm: Norm = Norm(),
        pool: str = "max",
        rngs: nnx.Rngs,
    ):
        check_stem_pool(pool)
        self.in_features, self.out_features, self.pool = in_features, out_features, pool
        self.conv = _stem_conv(in_features, out_features, 7, 2, [(3, 3)] * 2, norm, rngs)
        self.norm = norm(out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return conv_stem_pool(nnx.relu(self.norm(self.conv(x))), self.pool)


class PatchStem(nnx.Module):
    """A block x block stride-block conv (no bias), BN, ReLU: ``[b,224,224,3] -> [b,56,56,w]``
    at block 4. Not in the paper: the conv counterpart of ``AttentionStem``'s geometry (each
    output sees one non-overlapping block x block tile of pixels), a control for how much of
    the attention stem's gap to the conv stem is its geometry rather than its attention.
    ``kernel > block`` (0: ``block``) widens each output's window to kernel x kernel pixels
    at the same stride, centred on its tile (zero padding ``(kernel - block) // 2`` before,
    the rest after): windows that overlap their neighbours', with the output size kept."""

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        block: int = 4,
        kernel: int = 0,
        norm: Norm = Norm(),
        rngs: nnx.Rngs,
    ):
        kernel = kernel or block
        if block < 1 or kernel < block:
            raise ValueError(f"need block >= 1 and kernel >= block, got {block} and {kernel}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        before = (kernel - block) // 2
        pads = [(before, kernel - block - before)] * 2
        self.conv = _stem_conv(in_features, out_features, kernel, block, pads, norm, rngs)
        self.norm = norm(out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if x.shape[1] % self.block or x.shape[2] % self.block:
            raise ValueError(
                f"the patch stem needs height and width divisible by block={self.block}, "
                f"got {tuple(x.shape[1:3])}"
            )
        return nnx.relu(self.norm(self.conv(x)))


class AttentionStem(nnx.Module):
    """The attention stem: ``StemAttention`` (attention in each block x block tile with
    spatially-aware values), batch norm, ReLU and a block x block max pool:
    ``[b, 224, 224, 3] -> [b, 56, 56, 64]``. The paper names the norm and the pool; the ReLU
    between them is our choice, as in the conv stem. ``attention_kwargs`` go to
    ``StemAttention`` (block, values, heads, implementation, dtypes).

    ``window > 0`` is not the paper's stem but the conv stem's geometry with attention in
    place of its 7x7/2 convolution: ``SlidingStemAttention`` over a ``window x window``
    neighbourhood of every second pixel, BN, ReLU, a 3x3 stride-2 max pool; neighbouring
    outputs overlap. It takes the spatially-aware values only and ignores ``block`` and
    ``implementation``."""

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        norm: Norm = Norm(),
        window: int = 0,
        rngs: nnx.Rngs,
        **attention_kwargs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.block = attention_kwargs.get("block", 4)
        if window:
            self.attention = _sliding_stem_attention(
                in_features, out_features, window, rngs, attention_kwargs
            )
        else:
            self.attention = StemAttention(in_features, out_features, rngs=rngs, **attention_kwargs)
        self.norm = norm(out_features, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if isinstance(self.attention, SlidingStemAttention):
            return conv_stem_pool(nnx.relu(self.norm(self.attention(x))))
        return attend_norm_pool(self.attention, self.norm, x)


def _sliding_stem_attention(in_features, out_features, window, rngs, kwargs):
    values = kwargs.get("values", "spatially_aware")
    if values != "spatially_aware":
        raise ValueError(f"a sliding-window stem has spatially-aware values only, got {values!r}")
    names = ("num_heads", "num_mixtures", "zero_query", "embed_dim", "dtype", "param_dtype")
    chosen = {name: kwargs[name] for name in names if name in kwargs}
    return SlidingStemAttention(
        in_features, out_features, window=window, strides=2, rngs=rngs, **chosen
    )


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
      remat_stem: recompute the stem's forward in the backward pass (``nnx.remat``) instead
        of keeping its activations; the same numbers, less memory where the stem's
        full-resolution activations make the step's peak (the attention stem on TPU and GPU).
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
        remat_stem: bool = False,
        rngs: nnx.Rngs,
    ):
        if len(spatial) != len(stage_sizes):
            raise ValueError(
                f"need one spatial factory per stage ({len(stage_sizes)}), got {len(spatial)}"
            )
        widths = [_scaled(w, width_multiplier) for w in STAGE_WIDTHS[: len(stage_sizes)]]
        self.stem = stem(in_features, _scaled(64, width_multiplier), rngs=rngs)
        self.remat_stem = remat_stem
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
        y = _rematerialised(self.stem, x) if self.remat_stem else self.stem(x)
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


@nnx.remat
def _rematerialised(module: nnx.Module, x: Array) -> Array:
    """``module(x)``, its forward recomputed in the backward pass."""
    return module(x)


def _scaled(width: int, multiplier: float) -> int:
    scaled = width * multiplier
    if scaled != int(scaled) or scaled < 1:
        raise ValueError(
            f"width_multiplier {multiplier} gives a non-integer width {scaled} "
            f"for base width {width}"
        )
    return int(scaled)


__all__ = [
    "EXPANSION",
    "STAGE_WIDTHS",
    "AttentionStem",
    "Bottleneck",
    "ConvStem",
    "PatchStem",
    "ResNet",
    "SpatialFactory",
    "attention",
]
