"""What a workdir holds about its run, and which commands may resume it (fast: no training)."""

from __future__ import annotations

import pathlib

import pytest

from sasa_jax.train import config as config_lib
from sasa_jax.train import loop as train_lib
from sasa_jax.train import workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(path, arg=None):
    return config_lib.from_file(ROOT / path, arg)


def test_workdir_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        train_lib.train_and_evaluate(_config("configs/digits.py"), str(path))


def test_resume_check_allows_only_run_length_and_speed_fields(tmp_path):
    config = _config("configs/digits.py")
    workdir.save_config(config, tmp_path, num_classes=10)
    with config.unlocked():
        config.num_train_steps, config.log_every_steps, config.num_threads = 900, 7, 1
    assert len(workdir.resume_changes(config, tmp_path)) == 3
    for field, value in (("seed", 3), ("dataset", "image_folder"), ("batch_size", 32)):
        changed = _config("configs/digits.py")
        changed[field] = value
        with pytest.raises(ValueError, match=f"{field}: "):
            workdir.resume_changes(changed, tmp_path)
