"""``python -m sasa_jax.evaluate``: a run's checkpoint evaluated again, on a real trained run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sasa_jax import evaluate
from sasa_jax.train import config as config_lib
from sasa_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _last_eval(run: pathlib.Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "eval_top1" in line][-1]


@pytest.mark.slow
def test_evaluate_repeats_the_runs_eval_and_reads_other_crops(tmp_path, monkeypatch):
    """With no settings it gives the trainer's own eval of that step, to the bit; another
    crop fraction changes the numbers on the same examples."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = config_lib.from_file(ROOT / "configs/digits.py")
    config.num_train_steps = 4
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    run = tmp_path / "run"
    loop.train_and_evaluate(config, str(run))
    logged = _last_eval(run)

    again = evaluate.evaluate_run(str(run))
    assert again["step"] == 4 == logged["step"]
    for name in ("eval_top1", "eval_top5", "eval_loss", "eval_examples"):
        assert again["metrics"][name] == logged[name], name

    first = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    at_two = [line for line in first if "eval_top1" in line and line["step"] == 2][0]
    assert evaluate.evaluate_run(str(run), step=2)["metrics"]["eval_loss"] == at_two["eval_loss"]

    cropped = evaluate.evaluate_run(str(run), settings=["eval_crop_fraction=0.5"])
    assert cropped["metrics"]["eval_examples"] == logged["eval_examples"]
    assert cropped["metrics"]["eval_loss"] != logged["eval_loss"]
    assert cropped["settings"] == ["eval_crop_fraction=0.5"]

    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        evaluate.evaluate_run(str(run), step=3)


def test_only_eval_fields_can_be_set():
    config = config_lib.from_file(ROOT / "configs/digits.py")
    changed = evaluate.with_eval_settings(config, ["eval_crop_fraction=0.75", "eval_batch_size=30"])
    assert changed.eval_crop_fraction == 0.75 and changed.eval_batch_size == 30
    assert config.eval_crop_fraction == 1.0  # the run's config is left as it was
    with pytest.raises(ValueError, match="cannot change 'batch_size'"):
        evaluate.with_eval_settings(config, ["batch_size=8"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        evaluate.with_eval_settings(config, ["eval_crop_fraction"])
    with pytest.raises(ValueError, match="is not a int"):
        evaluate.with_eval_settings(config, ["eval_batch_size=half"])
    with pytest.raises(ValueError, match="must be positive"):
        evaluate.with_eval_settings(config, ["eval_batch_size=0"])


def test_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "sasa_jax.evaluate", f"--workdir={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "holds no run of train.py" in proc.stderr
    assert "Traceback" not in proc.stderr
