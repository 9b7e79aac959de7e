"""Shared config pieces: the default config every config file derives from, and the parser
for the ``--config=FILE:ARG`` argument string (``key=value,key=value``)."""

from __future__ import annotations

import dataclasses

import ml_collections

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
    config.eval_crop_fraction = 0.875
    config.num_workers = 0  # Grain worker processes (0: decode in threads of this process)
    config.num_threads = 2  # decoding threads per process (or per worker)
    config.prefetch_batches = 2  # batches in flight onto the devices
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 130
    config.num_train_steps = -1  # wins over num_epochs when > 0
    config.warmup_epochs = 10
    config.base_learning_rate = 0.1  # per 256 examples: lr = base * batch_size / 256
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4
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


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_arg(arg: str | None) -> dict:
    """``"depth=50,variant=full_attention"`` -> ``{"depth": 50, "variant": "full_attention"}``."""
    result = {}
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument items must be key=value, got {item!r} in {arg!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = _parse_value(value.strip())
    return result


def apply_model_arg(config: ml_collections.ConfigDict, arg: str | None):
    """Sets ``config.model`` fields from the argument string; unknown keys raise ValueError."""
    for key, value in parse_arg(arg).items():
        field = MODEL_ALIASES.get(key, key)
        if field not in config.model:
            known = sorted(set(config.model) | set(MODEL_ALIASES))
            raise ValueError(f"unknown config argument {key!r}; known: {known}")
        current = config.model[field]
        if isinstance(current, str):
            value = str(value)
        elif isinstance(current, float):
            value = float(value)
        config.model[field] = value
    return config
