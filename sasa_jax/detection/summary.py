"""Parameters and FLOPs of a RetinaNet, in ``sasa_jax.summary``'s two conventions.

The backbone is counted as ``sasa_jax.summary`` counts a ResNet, without its classifier (a
detector has none). The FPN: its 1x1 laterals on C3-C5, its spatial layers at P3-P5, P6 (at the
resolution of its input, P5 or C5) and P7. The heads are shared across levels, so their
layers are counted once per level P3-P7. Post-processing (decoding, NMS) is not counted.
"""

from __future__ import annotations

from sasa_jax.detection.projection import ProjectedAttention
from sasa_jax.detection.retinanet import RetinaNet
from sasa_jax.summary import module_flops, param_count


def _layer_flops(layer, h: int, w: int, convention: str) -> tuple[int, int, int]:
    """``module_flops``, plus ``ProjectedAttention``: its attention, then ``W_O`` on the
    attention's output."""
    if not isinstance(layer, ProjectedAttention):
        return module_flops(layer, h, w, convention)
    flops, oh, ow = module_flops(layer.attention, h, w, convention)
    return flops + module_flops(layer.projection, oh, ow, convention)[0], oh, ow


def _backbone(model: RetinaNet, size: int, convention: str) -> tuple[int, dict[str, int]]:
    """Backbone FLOPs and the side of c2..c5."""
    backbone = model.backbone
    flops, h, _ = module_flops(backbone.stem, size, size, convention)
    sides = {}
    for index, stage in enumerate(backbone.stages):
        for block in stage:
            f, h, _ = module_flops(block, h, h, convention)
            flops += f
        sides[f"c{index + 2}"] = h
    return flops, sides


def _fpn(model: RetinaNet, sides: dict[str, int], convention: str) -> tuple[int, dict[str, int]]:
    """FPN FLOPs and the side of p3..p7."""
    fpn = model.fpn
    flops = 0
    levels = {}
    for i, (lateral, output) in enumerate(zip(fpn.laterals, fpn.outputs, strict=True)):
        side = sides[f"c{i + 3}"]
        flops += module_flops(lateral, side, side, convention)[0]
        f, levels[f"p{i + 3}"], _ = _layer_flops(output, side, side, convention)
        flops += f
    side = levels["p5"] if fpn.p6_from == "p5" else sides["c5"]
    f, levels["p6"], _ = _layer_flops(fpn.p6, side, side, convention)
    flops += f
    f, levels["p7"], _ = _layer_flops(fpn.p7, levels["p6"], levels["p6"], convention)
    return flops + f, levels


def _head(head, levels: dict[str, int], convention: str) -> int:
    flops = 0
    for side in levels.values():
        for layer in [*head.layers, head.output]:
            flops += _layer_flops(layer, side, side, convention)[0]
    return flops


def summarize_detector(model: RetinaNet, image_size: int) -> dict:
    """Params and FLOPs of one ``image_size`` square image, per part (backbone, fpn,
    class_head, box_head), in the paper's convention (``flops``) and as computed."""
    parts: dict[str, dict] = {}
    for convention, key in (("paper", "flops"), ("computed", "flops_computed")):
        backbone, sides = _backbone(model, image_size, convention)
        fpn, levels = _fpn(model, sides, convention)
        values = {
            "backbone": backbone,
            "fpn": fpn,
            "class_head": _head(model.class_head, levels, convention),
            "box_head": _head(model.box_head, levels, convention),
        }
        for name, flops in values.items():
            parts.setdefault(name, {})[key] = flops
    modules = {
        "backbone": model.backbone,
        "fpn": model.fpn,
        "class_head": model.class_head,
        "box_head": model.box_head,
    }
    for name, module in modules.items():
        parts[name]["params"] = param_count(module)
        parts[name]["output"] = []
    return {
        "params": param_count(model),
        "flops": sum(p["flops"] for p in parts.values()),
        "flops_computed": sum(p["flops_computed"] for p in parts.values()),
        "image_size": image_size,
        "stages": parts,
    }
