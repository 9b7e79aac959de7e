"""The trainer's config checks: one clear ValueError before anything is built or compiled."""

from __future__ import annotations

import pathlib

import pytest

from sasa_jax.train import config as config_lib
from sasa_jax.train import loop as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(path, arg=None):
    return config_lib.from_file(ROOT / path, arg)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dataset", "cifar10", "config.dataset"),
        ("num_epochs", 0, "num_train_steps"),
        ("ema_decay", 1.0, "ema_decay"),
        ("eval_batch_size", 0, "eval_batch_size"),
        ("pixel_mean", (0.5, 0.5), "pixel_mean needs 3 values"),
        ("pixel_std", (0.3, 0.0, 0.3), "pixel_std must be positive"),
        ("translate_pixels", -1, "translate_pixels must be >= 0"),
    ],
)
def test_config_errors(field, value, match):
    config = _config("configs/digits.py")
    config[field] = value
    if field == "num_epochs":
        config.num_train_steps = -1
    with pytest.raises(ValueError, match=match):
        train_lib.validate_config(config)


def test_unknown_variant_is_a_config_error():
    config = _config("configs/digits.py")
    config.model.variant = "resnext"
    with pytest.raises(ValueError, match="model.variant"):
        train_lib.validate_config(config)


@pytest.mark.parametrize("accum, match", [(0, "must be >= 1"), (7, "divide config.batch_size")])
def test_grad_accum_steps_must_divide_the_batch(accum, match):
    config = _config("configs/digits.py")
    config.grad_accum_steps = accum
    with pytest.raises(ValueError, match=match):
        train_lib.validate_config(config)


def test_a_detection_dataset_needs_a_detection_config():
    config = _config("configs/digits.py")
    config.dataset = "digit_scenes"
    with pytest.raises(ValueError, match="is for detection"):
        train_lib.check_config(config)


def test_pixel_normalisation_comes_from_the_config():
    """(x / 255 - mean) / std per channel, against NumPy; ImageNet's for a run recorded
    before the fields existed."""
    import ml_collections
    import numpy as np

    from sasa_jax import tasks

    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3) * 2
    config = _config("configs/digits.py")
    config.pixel_mean = (0.1, 0.2, 0.3)
    config.pixel_std = (0.5, 0.25, 2.0)
    got = np.asarray(tasks.normalized_images(config, {"image": images}))
    expected = (images / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    recorded = ml_collections.ConfigDict(config.to_dict())
    del recorded["pixel_mean"], recorded["pixel_std"]
    got = np.asarray(tasks.normalized_images(recorded, {"image": images}))
    imagenet = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(got, imagenet, rtol=1e-6, atol=1e-6)
