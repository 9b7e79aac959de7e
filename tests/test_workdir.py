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


def test_eval_times_read_each_evals_first_scalar_from_every_events_file(tmp_path):
    """Known wall times, written as a run writes them (tensorboardX), across a resume."""
    from tensorboardX import SummaryWriter

    from sasa_jax.train import metrics

    first = SummaryWriter(logdir=str(tmp_path), filename_suffix=".a")
    first.add_scalar("train_loss", 2.0, global_step=5, walltime=50.0)  # not an eval
    first.add_scalar("eval_top1", 0.5, global_step=10, walltime=100.0)
    first.add_scalar("eval_loss", 1.0, global_step=10, walltime=101.0)
    first.close()
    resumed = SummaryWriter(logdir=str(tmp_path), filename_suffix=".b")
    for step, when in ((20, 112.0), (30, 130.0)):
        resumed.add_scalar("eval_loss", 1.0, global_step=step, walltime=when + 2)
        resumed.add_scalar("eval_top1", 0.6, global_step=step, walltime=when)
    resumed.close()
    assert metrics.eval_times(tmp_path) == [(10, 100.0), (20, 112.0), (30, 130.0)]
    assert metrics.seconds_per_eval(tmp_path) == pytest.approx(15.0)


def test_eval_times_say_what_is_missing(tmp_path):
    from tensorboardX import SummaryWriter

    from sasa_jax.train import metrics

    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        metrics.eval_times(tmp_path)
    writer = SummaryWriter(logdir=str(tmp_path))
    writer.add_scalar("eval_top1", 0.5, global_step=10, walltime=100.0)
    writer.close()
    with pytest.raises(ValueError, match="1 eval"):
        metrics.seconds_per_eval(tmp_path)
