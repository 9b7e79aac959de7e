"""The config argument string: typed model fields, the image folder's argument."""

from __future__ import annotations

import pathlib

import pytest

from sasa_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(path, arg=None):
    return config_lib.from_file(ROOT / path, arg)


def test_every_model_field_takes_its_own_type():
    config = _config(
        "configs/imagenet.py",
        "depth=38,variant=full_attention,window=9,stages=34,width=0.5,zero_init_residual=False,"
        "bn_epsilon=1e-3,logits=qr",
    )
    model = config.model
    assert (model.depth, model.variant, model.window, model.attention_stages) == (
        38,
        "full_attention",
        9,
        "34",
    )
    assert model.width_multiplier == 0.5 and model.bn_epsilon == 1e-3 and model.logits == "qr"
    assert model.zero_init_residual is False
    plain = _config("configs/imagenet.py")
    assert {k: v for k, v in config.items() if k != "model"} == {
        k: v for k, v in plain.items() if k != "model"
    }


@pytest.mark.parametrize("text, expected", [("true", True), ("No", False), ("1", True)])
def test_bools(text, expected):
    assert config_lib.parse_value(text, True, "f") is expected


def test_bad_values():
    with pytest.raises(ValueError, match="model.window must be int, got '3x5'"):
        _config("configs/imagenet.py", "window=3x5")
    with pytest.raises(ValueError, match="model.depth must be int, got 'fifty'"):
        _config("configs/imagenet.py", "depth=fifty")
    with pytest.raises(ValueError, match="zero_init_residual must be bool"):
        _config("configs/imagenet.py", "zero_init_residual=maybe")
    with pytest.raises(ValueError, match="unknown config argument"):
        _config("configs/imagenet.py", "depht=50")
    with pytest.raises(ValueError, match="key=value"):
        config_lib.parse_arg("depth")


def test_image_folder_takes_the_folder_then_model_fields(tmp_path):
    folder = tmp_path / "my=images"
    config = _config("configs/image_folder.py", f"{folder},variant=baseline,window=3")
    assert config.image_folder == str(folder)
    assert (config.model.variant, config.model.window) == ("baseline", 3)
    assert _config("configs/image_folder.py", str(folder)).model.variant == "conv_stem_attention"
    with pytest.raises(ValueError, match="give the image folder"):
        _config("configs/image_folder.py")
