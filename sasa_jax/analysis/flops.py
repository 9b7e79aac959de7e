r"""Parameters and FLOPs of a ResNet, from its modules (a registry of counters per module kind that
other model families extend: ``add_counter``). ``python -m sasa_jax.summary`` prints them.

FLOPs are for one image at the config's size, 2 FLOPs per multiply-add (the paper's rule), in
two conventions that differ only in attention layers:

* ``flops`` -- the paper's convention, eq. 3 and eq. 8 as written, which reproduces its tables:
  * Counted: every convolution and dense layer (2 * output pixels * kernel taps * in * out); in
    attention layers the Q/K/V projections, the q.k logits (k*k taps per query), the relative
    logits as a full-width dot product q.r_{a-i,b-j} per window tap (k*k*dim per query and
    head, like q.k), and the weighted sum of the values (k*k taps per query).
  * The attention stem: 4x4 windows at full resolution (224x224); spatially-aware values as M
    separate value projections plus their p-weighted mix (M*out per pixel); the spatial-conv
    values as their 4x4 convolution.
* ``flops_computed`` -- what this code executes: the relative term is factorised, so per query
  and head it costs (len(rel_row) + len(rel_col)) * dim/2 multiply-adds ((kh + kw) * dim/2 for
  borders mask/zeros, (2kh-1 + 2kw-1) * dim/2 for clamp) instead of kh*kw*dim; and the stem
  mixes the M value matrices first (2*16*M*in*out FLOPs), so its values cost one projection.

Both conventions:
  * count window taps outside the image like the others (the compiled op runs them);
  * count a strided attention layer at its input resolution (it attends, then average-pools);
  * do not count batch norm, activations, softmax, pooling, residual additions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from flax import nnx

from sasa_jax.models import AttentionStem, Bottleneck, ConvStem, PatchStem, ResNet
from sasa_jax.nn import SelfAttention2D, SlidingStemAttention, StemAttention

Counter = Callable[..., tuple[int, int, int]]
CONVENTIONS = ("paper", "computed")


def _out_size(size: int, kernel: int, stride: int, padding) -> int:
    if padding == "SAME":
        return math.ceil(size / stride)
    if padding == "VALID":
        return (size - kernel) // stride + 1
    low, high = padding
    return (size + low + high - kernel) // stride + 1


def conv_flops(conv: nnx.Conv, h: int, w: int, convention: str = "paper") -> tuple[int, int, int]:
    """(FLOPs, out height, out width) of an ``nnx.Conv`` on an ``h x w`` input."""
    kh, kw, cin, cout = conv.kernel.shape
    strides = conv.strides if isinstance(conv.strides, tuple | list) else (conv.strides,) * 2
    padding = conv.padding
    pads = [padding, padding] if isinstance(padding, str) else list(padding)
    oh = _out_size(h, kh, strides[0], pads[0])
    ow = _out_size(w, kw, strides[1], pads[1])
    return 2 * oh * ow * kh * kw * cin * cout // conv.feature_group_count, oh, ow


def _relative_flops(pixels: int, taps: int, lengths: int, out: int, convention: str) -> int:
    if convention == "paper":
        return 2 * pixels * taps * out  # a full-width q.r per tap
    return 2 * pixels * lengths * out // 2  # q halves times every table row


def attention_flops(
    layer: SelfAttention2D, h: int, w: int, convention: str = "paper"
) -> tuple[int, int, int]:
    """(FLOPs, out height, out width) of a SASA layer; see the module docstring."""
    pixels, out = h * w, layer.out_features
    kh, kw = layer.window
    projections = 2 if layer.key is None else 3
    flops = 2 * pixels * layer.in_features * out * projections
    taps = kh * kw
    flops += 2 * pixels * taps * out * (1 if layer.key is None else 2)  # [q.k] and sum of v
    if layer.rel_row is not None:
        lengths = layer.rel_row.shape[0] + layer.rel_col.shape[0]
        flops += _relative_flops(pixels, taps, lengths, out, convention)
    s = layer.strides
    return flops, math.ceil(h / s), math.ceil(w / s)


def stem_attention_flops(
    stem: StemAttention, h: int, w: int, convention: str = "paper"
) -> tuple[int, int, int]:
    """(FLOPs, out height, out width) of the attention stem's attention; see the module
    docstring."""
    pixels, cin, out, s = h * w, stem.in_features, stem.out_features, stem.block
    flops = 2 * 2 * pixels * cin * out  # W_Q, W_K
    if stem.value_conv is not None:
        flops += conv_flops(stem.value_conv, h, w)[0]
    elif stem.value_mixture is None:
        flops += 2 * pixels * cin * out
    else:
        mixtures = stem.value_mixture.shape[0]
        if convention == "paper":  # M projections, then their p-weighted sum
            flops += 2 * pixels * mixtures * cin * out + 2 * pixels * mixtures * out
        else:  # mix the M matrices per block position, then one projection
            flops += 2 * s * s * mixtures * cin * out + 2 * pixels * cin * out
    flops += 2 * 2 * pixels * s * s * out  # logits and weighted values over the s*s block
    lengths = stem.rel_row.shape[0] + stem.rel_col.shape[0]
    flops += _relative_flops(pixels, s * s, lengths, out, convention)
    return flops, h, w


def sliding_stem_flops(
    stem: SlidingStemAttention, h: int, w: int, convention: str = "paper"
) -> tuple[int, int, int]:
    """(FLOPs, out height, out width) of a sliding-window stem attention (not the paper's).
    "paper": as eq. 3 and 8 read with the window's offsets for positions: W_Q and W_K, M
    value projections, a p-weighted mix of them per query and tap (M*out), q.k, q.r and the
    weighted sum per tap. "computed": the folded form the layer executes on accelerators (its
    docstring; on CPU it applies each tap's mixed value matrix instead)."""
    h, w = math.ceil(h / stem.strides), math.ceil(w / stem.strides)
    pixels, cin, out = h * w, stem.in_features, stem.out_features
    taps, heads = stem.window**2, stem.num_heads
    mixtures = stem.value_mixture.shape[0]
    if convention == "paper":
        flops = 2 * 2 * pixels * cin * out + 2 * pixels * mixtures * cin * out
        flops += 2 * pixels * taps * mixtures * out + 2 * 2 * pixels * taps * out
        return flops + _relative_flops(pixels, taps, 2 * stem.window, out, convention), h, w
    folded = 2 * cin * cin * out + 2 * cin * stem.window * out  # W_Q W_K^T, W_Q r
    logits = 2 * heads * (cin * cin + taps * cin + 2 * stem.window * cin)
    values = 2 * taps * mixtures * cin * (1 + heads) + 2 * mixtures * cin * out
    return folded + pixels * (logits + values), h, w


def _conv_stem_pool_size(h: int, w: int) -> tuple[int, int]:
    """The map's size after the conv stem's 3x3 stride-2 max pool (``conv_stem_pool``)."""
    return _out_size(h, 3, 2, (1, 1)), _out_size(w, 3, 2, (1, 1))


def _attention_stem_flops(stem: AttentionStem, h: int, w: int, convention: str):
    flops, h, w = module_flops(stem.attention, h, w, convention)
    if isinstance(stem.attention, SlidingStemAttention):
        return (flops, *_conv_stem_pool_size(h, w))
    return flops, h // stem.block, w // stem.block


def _conv_stem_flops(stem: ConvStem, h: int, w: int, convention: str):
    flops, h, w = conv_flops(stem.conv, h, w)
    return (flops, *_conv_stem_pool_size(h, w))


def module_flops(
    module: nnx.Module, h: int, w: int, convention: str = "paper"
) -> tuple[int, int, int]:
    """(FLOPs, out height, out width) of any module a ResNet is built from.

    ``convention`` is "paper" or "computed" (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    for kind, counter in _COUNTERS:
        if isinstance(module, kind):
            return counter(module, h, w, convention)
    raise TypeError(f"no FLOP counter for {type(module).__name__}")


def _bottleneck_flops(block: Bottleneck, h: int, w: int, convention: str):
    f1, _, _ = conv_flops(block.conv1, h, w)
    f2, oh, ow = module_flops(block.spatial, h, w, convention)
    f3, _, _ = conv_flops(block.conv3, oh, ow)
    f4 = conv_flops(block.shortcut, h, w)[0] if block.shortcut is not None else 0
    return f1 + f2 + f3 + f4, oh, ow


_COUNTERS: list[tuple[type, Counter]] = [
    (nnx.Conv, conv_flops),
    (SelfAttention2D, attention_flops),
    (StemAttention, stem_attention_flops),
    (SlidingStemAttention, sliding_stem_flops),
    (AttentionStem, _attention_stem_flops),
    (ConvStem, _conv_stem_flops),
    (PatchStem, lambda stem, h, w, convention: conv_flops(stem.conv, h, w)),
    (Bottleneck, _bottleneck_flops),
]


def add_counter(kind: type, counter: Counter) -> None:
    """Counts modules of ``kind`` (checked before the counters above) with ``counter(module,
    h, w, convention) -> (FLOPs, out height, out width)``: how other model families (RetinaNet's
    parts, ``retinanet_flops``) extend ``module_flops``."""
    _COUNTERS.insert(0, (kind, counter))


def param_count(module) -> int:
    """The number of parameters of a module (any NNX module: a model or one of its parts)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def backbone_parts(model: ResNet, image_size: int, convention: str) -> dict[str, tuple[int, list]]:
    """``{part: (FLOPs, output shape [h, w, channels])}`` for the stem and each stage of a
    ResNet on a square ``image_size`` image (stage ``i``'s output is feature map ``c{i+1}``)."""
    h = w = image_size
    flops, h, w = module_flops(model.stem, h, w, convention)
    parts = {"stem": (flops, [h, w, model.stem.out_features])}
    for index, stage in enumerate(model.stages):
        total = 0
        for block in stage:
            flops, h, w = module_flops(block, h, w, convention)
            total += flops
        parts[f"stage{index + 1}"] = (total, [h, w, stage[-1].conv3.out_features])
    return parts


def _parts(model: ResNet, image_size: int, convention: str) -> dict[str, tuple[int, list]]:
    """``backbone_parts`` and the classifier head."""
    parts = backbone_parts(model, image_size, convention)
    head = model.head
    parts["head"] = (2 * head.in_features * head.out_features, [head.out_features])
    return parts


def summarize(model: ResNet, image_size: int) -> dict:
    """Params and FLOPs (both conventions) of one square image, with a per-part breakdown."""
    paper = _parts(model, image_size, "paper")
    computed = _parts(model, image_size, "computed")
    modules = {"stem": model.stem, "head": model.head}
    modules.update({f"stage{i + 1}": stage for i, stage in enumerate(model.stages)})
    stages = {
        name: {
            "params": param_count(modules[name]),
            "flops": paper[name][0],
            "flops_computed": computed[name][0],
            "output": paper[name][1],
        }
        for name in paper
    }
    return {
        "params": param_count(model),
        "flops": sum(flops for flops, _ in paper.values()),
        "flops_computed": sum(flops for flops, _ in computed.values()),
        "image_size": image_size,
        "stages": stages,
    }


__all__ = [
    "CONVENTIONS",
    "add_counter",
    "attention_flops",
    "backbone_parts",
    "conv_flops",
    "module_flops",
    "param_count",
    "stem_attention_flops",
    "summarize",
]
