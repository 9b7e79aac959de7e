"""Parameters and FLOPs of a RetinaNet, in ``flops``' two conventions.

The backbone is counted as ``flops`` counts a ResNet, without its classifier (a
detector has none). The FPN: its 1x1 laterals on C3-C5, its spatial layers at P3-P5, P6 (at the
resolution of its input, P5 or C5) and P7. The heads are shared across levels, so their
layers are counted once per level P3-P7. Post-processing (decoding, NMS) is not counted.
"""

from __future__ import annotations

from sasa_jax.analysis.flops import add_counter, backbone_parts, module_flops, param_count
from sasa_jax.models.projection import ProjectedAttention
from sasa_jax.models.retinanet import RetinaNet


def _projected_attention_flops(layer: ProjectedAttention, h: int, w: int, convention: str):
    """Its attention, then ``W_O`` on the attention's output."""
    flops, oh, ow = module_flops(layer.attention, h, w, convention)
    return flops + module_flops(layer.projection, oh, ow, convention)[0], oh, ow


add_counter(ProjectedAttention, _projected_attention_flops)


def _backbone(model: RetinaNet, size: int, convention: str) -> tuple[int, dict[str, int]]:
    """Backbone FLOPs and the side of c2..c5."""
    parts = backbone_parts(model.backbone, size, convention)
    sides = {f"c{i + 2}": parts[f"stage{i + 1}"][1][0] for i in range(len(parts) - 1)}
    return sum(flops for flops, _ in parts.values()), sides


def _fpn(model: RetinaNet, sides: dict[str, int], convention: str) -> tuple[int, dict[str, int]]:
    """FPN FLOPs and the side of p3..p7."""
    fpn = model.fpn
    flops = 0
    levels = {}
    for i, (lateral, output) in enumerate(zip(fpn.laterals, fpn.outputs, strict=True)):
        side = sides[f"c{i + 3}"]
        flops += module_flops(lateral, side, side, convention)[0]
        f, levels[f"p{i + 3}"], _ = module_flops(output, side, side, convention)
        flops += f
    side = levels["p5"] if fpn.p6_from == "p5" else sides["c5"]
    f, levels["p6"], _ = module_flops(fpn.p6, side, side, convention)
    flops += f
    f, levels["p7"], _ = module_flops(fpn.p7, levels["p6"], levels["p6"], convention)
    return flops + f, levels


def _head(head, levels: dict[str, int], convention: str) -> int:
    flops = 0
    for side in levels.values():
        for layer in [*head.layers, head.output]:
            flops += module_flops(layer, side, side, convention)[0]
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
