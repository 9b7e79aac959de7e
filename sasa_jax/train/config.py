"""Shared config pieces: the default config every config file derives from, the parser for
the ``--config=FILE:ARG`` argument string (``key=value,key=value``), and loading a config
file from Python."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import ml_collections

from sasa_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from sasa_jax.models import ModelSpec

# Short names accepted in the argument string, besides every ``config.model`` field.
MODEL_ALIASES = {"width": "width_multiplier", "heads": "num_heads", "stages": "attention_stages"}


def default_config() -> ml_collections.ConfigDict:
    """Fields shared by every config; each config file overrides what it needs."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dataclasses.asdict(ModelSpec()))
    config.dataset = "imagenet2012"
    config.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.image_folder = ""  # for dataset "image_folder"
    config.eval_split = ""  # "" = the dataset's own (validation/test), or "minival"
    config.minival_percent = 4  # minival = the first 4% of train, as in the paper
    config.image_size = 224
    config.crop_area_min = 0.08  # Inception crop: area fraction in [crop_area_min, 1]
    config.crop_ratio_min = 3 / 4
    config.crop_ratio_max = 4 / 3
    config.random_flip = True
    config.translate_pixels = 0  # then a shift of up to this many whole pixels (no resampling)
    config.eval_crop_fraction = 0.875
    # On the device, each RGB channel of x / 255 becomes (x / 255 - pixel_mean) / pixel_std.
    config.pixel_mean = IMAGENET_MEAN
    config.pixel_std = IMAGENET_STD
    config.num_workers = 0  # Grain worker processes (0: decode in threads of this process)
    config.num_threads = 2  # decoding threads per process (or per worker)
    config.prefetch_batches = 2  # batches in flight onto the devices
    config.batch_size = 256
    config.eval_batch_size = 256
    # Micro-batches per step: the gradients of batch_size / grad_accum_steps examples at a
    # time, summed inside the compiled step (the paper's batch of 4096 on a few devices).
    config.grad_accum_steps = 1
    config.num_epochs = 130
    config.num_train_steps = -1  # wins over num_epochs when > 0
    config.warmup_epochs = 10
    config.base_learning_rate = 0.1  # per 256 examples: lr = base * batch_size / 256
    config.optimizer = "sgd"  # or "adamw" (then momentum and nesterov are unused)
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4
    # Learning-rate multipliers by parameter path prefix, "stem:0.25,fpn:2" ("" for none).
    config.learning_rate_scales = ""
    config.label_smoothing = 0.1
    config.ema_decay = 0.0  # 0 disables the EMA of the weights
    config.half_precision = False
    # Cross-device means added in device order (sasa_jax.parallel): any split of the devices
    # over processes gives the same numbers. False: XLA's all-reduces, layout-dependent rounding.
    config.deterministic_reductions = True
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.seed = 0
    return config


def small_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets the small attention ResNet the bundled datasets train (ResNet-26 layout, widths
    x0.25, conv stem and attention in every stage, 5x5 windows, batch-norm momentum 0.9);
    returns ``config``."""
    config.model.depth = 26
    config.model.variant = "conv_stem_attention"
    config.model.width_multiplier = 0.25
    config.model.window = 5
    config.model.bn_momentum = 0.9
    return config


def detection_config() -> ml_collections.ConfigDict:
    """``default_config`` plus the detection fields: ``config.detection`` (the RetinaNet,
    its anchors, loss, augmentation and post-processing) and ``config.coco_folder``."""
    config = default_config()
    config.coco_folder = ""  # for dataset "coco_folder"
    config.label_smoothing = 0.0  # not used by detection
    config.detection = ml_collections.ConfigDict(
        {
            "heads": "conv",  # FPN and heads: "conv" or "attention"
            "fpn": "",  # the FPN alone: "" (as heads), "conv" or "attention"
            "fpn_width": 256,
            "head_depth": 4,
            "p6_from": "p5",  # "p5" or "c5"
            "head_norm": True,  # batch norm after each head layer, per level
            "fpn_norm": "attention",  # batch norms after the FPN's layers: attention FPNs only
            # ("all", "none"); models/fpn.py says why
            "attention_projection": False,  # W_O after each FPN/head SASA layer (a convention)
            "head_residual": "attention",  # attention heads' layers add their input ("all", "none")
            "anchor_size": 4.0,  # base anchor side = anchor_size * stride (32 px at P3)
            "force_match": False,  # also make each box's best anchor positive, at any IoU
            "max_boxes": 100,  # ground-truth boxes per image after padding
            "box_weight": 50.0,  # Huber box loss weight (delta 0.1)
            "scale_min": 0.8,  # multiscale jitter of the training images
            "scale_max": 1.2,
            "score_threshold": 0.05,
            "pre_nms": 1000,  # best scores per class kept before NMS
            "max_detections": 100,
            "nms_iou": 0.5,
        }
    )
    return config


def apply_detection_arg(config: ml_collections.ConfigDict, arg: str | None):
    """Like ``apply_model_arg``, but keys that name a ``config.detection`` field (``heads``,
    ``fpn_width``, ``p6_from``, ...) set that field; the others are model fields."""
    model_items = []
    for key, text in parse_arg(arg).items():
        if key in config.detection:
            like = config.detection[key]
            config.detection[key] = parse_value(text, like, f"detection.{key}")
        else:
            model_items.append(f"{key}={text}")
    return apply_model_arg(config, ",".join(model_items))


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_value(text: str, like: Any, name: str) -> Any:
    """``text`` as a value of ``like``'s type (bool, int, float or str). Raises ValueError
    naming ``name``."""
    text = text.strip()
    try:
        if isinstance(like, bool):
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise ValueError(f"{name} must be {type(like).__name__}, got {text!r}") from None
    return text


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"depth=50,variant=full_attention"`` -> ``{"depth": "50", "variant": "full_attention"}``
    (values stay text: ``apply_model_arg`` types them by field)."""
    result = {}
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument items must be key=value, got {item!r} in {arg!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


def split_path_arg(arg: str | None) -> tuple[str, str]:
    """``"DIR,key=value,..."`` -> ``("DIR", "key=value,...")``: the leading path (which may
    hold "=" but no "," followed by ``key=``) and the model fields after it."""
    match = re.match(r"^(.*?)((?:,\s*[A-Za-z_]\w*=[^,]*)*)$", arg or "")
    path, rest = match.group(1), match.group(2).lstrip(",")
    return path.strip(), rest


def apply_model_arg(config: ml_collections.ConfigDict, arg: str | None):
    """Sets ``config.model`` fields from the argument string, each parsed as its field's type
    (``zero_init_residual=False`` is a bool). Unknown keys and bad values raise ValueError."""
    for key, text in parse_arg(arg).items():
        field = MODEL_ALIASES.get(key, key)
        if field not in config.model:
            known = sorted(set(config.model) | set(MODEL_ALIASES))
            raise ValueError(f"unknown config argument {key!r}; known: {known}")
        config.model[field] = parse_value(text, config.model[field], f"model.{field}")
    return config


def from_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (what ``--config=PATH:ARG`` gives
    train.py), for notebooks, scripts and tests."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    spec = importlib.util.spec_from_file_location("sasa_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
