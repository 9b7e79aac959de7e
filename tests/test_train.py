"""The trainer end to end: train.py runs, resumes, scales over devices and processes."""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sasa_jax import train_lib
from sasa_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "step",
    "train_loss",
    "learning_rate",
    "eval_top1",
    "eval_top5",
    "eval_loss",
    "steps_per_sec",
    "examples_per_sec",
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _train_command(workdir, *overrides, config="configs/digits.py"):
    return [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", *overrides]


def _env(tfds_dir, devices=1):
    return {
        **os.environ,
        "TFDS_DATA_DIR": tfds_dir,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _run(workdir, tfds_dir, *overrides, devices=1, check=True):
    proc = subprocess.run(
        _train_command(workdir, *overrides),
        cwd=ROOT,
        env=_env(tfds_dir, devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def _final_eval(workdir):
    return [r for r in read_metrics(workdir) if "eval_top1" in r][-1]


def _train_losses(workdir):
    return [r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r]


SHORT = (
    "--config.num_train_steps=4",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
)


def test_digits_end_to_end(tmp_path, tfds_dir):
    proc = _run(tmp_path, tfds_dir, *SHORT)
    records = read_metrics(tmp_path)
    assert all("step" in r for r in records)
    assert METRIC_KEYS <= set().union(*records)
    final = _final_eval(tmp_path)
    assert final["step"] == 4 and final["eval_examples"] == 360
    assert 0.0 <= final["eval_top1"] <= final["eval_top5"] <= 1.0
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    assert "step 4/4" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
    # Running the same command again finds the finished run and does no more steps.
    again = _run(tmp_path, tfds_dir, *SHORT)
    assert "step 1/4" not in again.stdout
    assert len(read_metrics(tmp_path)) == len(records)


def _wait_for_step(workdir, step, proc, timeout=300):
    start = time.time()
    path = pathlib.Path(workdir) / "metrics.jsonl"
    while time.time() - start < timeout:
        if proc.poll() is not None:
            return False
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(workdir)):
            return True
        time.sleep(0.02)
    return False


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, tfds_dir):
    steps = (
        "--config.num_train_steps=30",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
        "--config.eval_every_steps=1000",
    )
    _run(tmp_path / "whole", tfds_dir, *steps)
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _train_command(interrupted, *steps),
        cwd=ROOT,
        env=_env(tfds_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for_step(interrupted, 5, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in out
    stopped = max(r["step"] for r in read_metrics(interrupted))
    assert 5 <= stopped < 30
    _run(interrupted, tfds_dir, *steps)
    whole, resumed = _final_eval(tmp_path / "whole"), _final_eval(interrupted)
    assert resumed["step"] == whole["step"] == 30
    assert abs(resumed["eval_top1"] - whole["eval_top1"]) <= 1e-6
    assert abs(resumed["eval_loss"] - whole["eval_loss"]) <= 1e-6
    np.testing.assert_allclose(
        _train_losses(interrupted)[-5:], _train_losses(tmp_path / "whole")[-5:], rtol=1e-6
    )


# Device-layout comparisons run the 20-step schedule of the acceptance check. Two processes of 2
# devices must log the very same 20 losses as one process of 4: the cross-device means add in
# device order (sasa_jax.parallel) and train.py gives every layout the same XLA thread pool.
# Layouts with other per-device shapes (1 device against 4) round differently inside XLA's
# kernels, and early training amplifies 1-ulp differences (ReLU and max-pool gradients switch
# on them), so those compare their first 6 losses.
LAYOUT_STEPS = (
    "--config.num_train_steps=20",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1000",
    "--config.eval_every_steps=1000",
)
COMPARED = 6


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, tfds_dir):
    workdir = tmp_path_factory.mktemp("four")
    proc = _run(workdir, tfds_dir, *LAYOUT_STEPS, devices=4)
    assert "4 devices in 1 processes" in proc.stdout
    return _train_losses(workdir)


def test_four_simulated_devices_match_one(tmp_path, tfds_dir, four_devices):
    _run(tmp_path, tfds_dir, *LAYOUT_STEPS)
    np.testing.assert_allclose(
        four_devices[:COMPARED], _train_losses(tmp_path)[:COMPARED], rtol=1e-5
    )


def test_xla_all_reduces_agree_with_the_ordered_means(tmp_path, tfds_dir, four_devices):
    # The plain jax.jit path (XLA's SPMD partitioner, flax's BatchNorm, no shard_map) is an
    # independent reference for the ordered means and the ordered batch norm's gradients.
    _run(tmp_path, tfds_dir, *LAYOUT_STEPS, "--config.deterministic_reductions=False", devices=4)
    np.testing.assert_allclose(
        _train_losses(tmp_path)[:COMPARED], four_devices[:COMPARED], rtol=1e-5
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, tfds_dir, four_devices):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_command(
                tmp_path,
                *LAYOUT_STEPS,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=_env(tfds_dir, devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "4 devices in 2 processes" in outputs[0][0]
    assert "step " not in outputs[1][0]  # only the primary process reports progress
    losses = _train_losses(tmp_path)
    assert len(losses) == len(four_devices) == 20
    np.testing.assert_array_equal(losses, four_devices)
    data_files = sorted(p.name for p in (tmp_path / "checkpoints" / "20" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
    proc = _run(
        tmp_path,
        tfds_dir,
        "--config.num_train_steps=40",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1",
        "--config.base_learning_rate=1e30",
        "--config.warmup_epochs=0",
        check=False,
    )
    assert proc.returncode != 0
    assert "NaN or Inf" in proc.stderr and "FloatingPointError" in proc.stderr
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    logged = [r for r in read_metrics(tmp_path) if "train_loss" in r]
    assert saved and all(math.isfinite(r["train_loss"]) for r in logged if r["step"] in saved)
    assert max(saved) < 40


def _config(path, arg=None):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dataset", "cifar10", "config.dataset"),
        ("num_epochs", 0, "num_train_steps"),
        ("ema_decay", 1.0, "ema_decay"),
        ("eval_batch_size", 0, "eval_batch_size"),
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


def test_batch_that_does_not_divide_over_devices_fails_before_compiling(tmp_path, tfds_dir):
    proc = _run(tmp_path, tfds_dir, "--config.batch_size=66", devices=4, check=False)
    assert proc.returncode != 0
    assert (
        "config.batch_size (66) must be a positive multiple of the number of devices (4)"
        in proc.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


def _fake_imagenet(builder, split, decoders=None, **kwargs):
    import io

    from PIL import Image

    if isinstance(split, list | tuple):
        return [_fake_imagenet(builder, s, decoders) for s in split]
    rng = np.random.default_rng(len(split))
    records = []
    for _ in range(20):
        image = rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        records.append({"image": buffer.getvalue(), "label": int(rng.integers(0, 1000))})
    return records


def test_mock_imagenet_end_to_end(tmp_path):
    """The ImageNet recipe (bf16, EMA, Nesterov) on mock data, a tiny full-attention model."""
    config = _config("configs/imagenet.py", "depth=26,variant=full_attention,width=0.25,window=3")
    config.image_size = 32
    config.batch_size = config.eval_batch_size = 8
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=20, as_data_source_fn=_fake_imagenet):
        result = train_lib.train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 2 and result["eval_examples"] == 20
    assert config.half_precision and config.ema_decay == 0.9999
    assert math.isfinite(result["eval_loss"]) and 0 <= result["eval_top1"] <= 1
