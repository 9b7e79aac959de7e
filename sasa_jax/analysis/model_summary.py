"""A config's model summarised: parameters and FLOPs per part, built abstractly (nothing is
allocated or compiled): a ResNet per stage (``flops``), a RetinaNet per part
(``retinanet_flops``)."""

from __future__ import annotations

from flax import nnx

from sasa_jax import data
from sasa_jax.analysis.flops import summarize
from sasa_jax.analysis.retinanet_flops import summarize_detector
from sasa_jax.models import ModelSpec, RetinaNet, build_model
from sasa_jax.tasks import detector_spec


def _summarize_detector_config(config) -> dict:
    spec = detector_spec(config, config.model.num_classes)
    model = nnx.eval_shape(lambda: RetinaNet(spec, rngs=nnx.Rngs(0)))
    result = summarize_detector(model, config.image_size)
    backbone = spec.backbone
    result["model"] = {
        "depth": backbone.depth,
        "variant": backbone.variant,
        "heads": spec.heads,
        "fpn": spec.resolved_fpn(),
        "p6_from": spec.p6_from,
        "num_classes": spec.num_classes,
        "window": backbone.window,
        "width_multiplier": backbone.width_multiplier,
    }
    return result


def summarize_config(config) -> dict:
    """``summarize`` for a config, building the model abstractly (no memory, no compile);
    a detection config's RetinaNet is summarised per part (``retinanet_flops``)."""
    if data.dataset_task(config.dataset) == "detection":
        return _summarize_detector_config(config)
    spec = ModelSpec.from_config(config.model)
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    result = summarize(model, config.image_size)
    result["model"] = {
        "depth": spec.depth,
        "stem": spec.resolved_stem(),
        "attention_stages": list(spec.resolved_attention_stages()),
        "window": spec.window,
        "positional": spec.positional,
        "logits": spec.logits,
        "stem_values": spec.stem_values,
        "width_multiplier": spec.width_multiplier,
    }
    return result


__all__ = ["summarize_config"]
