"""The trainer: train.py runs, resumes, refuses another run's workdir, stops on NaN, and gives
the same numbers on any layout of devices and processes.

Runs that need a fresh process (the command line, SIGTERM, simulated devices, several
processes) run train.py; the others call ``train_lib`` in-process. Every one-device run trains
the same compiled program (the learning rate is an argument of the step), so the suite's shared
compilation cache compiles it once.
"""

from __future__ import annotations

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

from sasa_jax.train import EXIT_STOPPED
from sasa_jax.train import config as config_lib
from sasa_jax.train import loop as train_lib
from sasa_jax.train.host import read_hosts
from sasa_jax.train.metrics import eval_times, read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "step",
    "train_loss",
    "train_top1",
    "learning_rate",
    "eval_top1",
    "eval_top5",
    "eval_loss",
    "steps_per_sec",
    "examples_per_sec",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _train_command(workdir, *overrides, config="configs/digits.py"):
    return [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", *overrides]


def _env(tfds_dir, devices=1):
    flags = os.environ.get("XLA_FLAGS", "")
    return {
        **os.environ,
        "TFDS_DATA_DIR": tfds_dir,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
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


def _eval_steps(workdir):
    return [r["step"] for r in read_metrics(workdir) if "eval_top1" in r]


def _train_losses(workdir):
    return [r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r]


def _config(path, arg=None):
    return config_lib.from_file(ROOT / path, arg)


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


# The digits runs below train 10 steps of two micro-batches each. Two processes of 2 devices
# must log the very same 10 losses as one process of 4: the cross-device means add in device
# order (sasa_jax.parallel) and train.py gives every layout the same XLA thread pool.
# (test_parallel.py checks the ordered means and batch norm against XLA's own all-reduces.)
# Layouts with other per-device shapes (1 device against 4) round differently inside XLA's
# kernels, and early training amplifies 1-ulp differences (ReLU and max-pool gradients switch
# on them), so those compare their first 5 losses.
STEPS = (
    "--config.grad_accum_steps=2",  # two micro-batches a step, on every layout
    "--config.num_train_steps=10",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=5",
    "--config.eval_every_steps=1000",
)
COMPARED = 5


def _sigterm_then_resume(workdir, tfds_dir, devices):
    """A run stopped with SIGTERM after step 3 and started again with the same command."""
    proc = subprocess.Popen(
        _train_command(workdir, *STEPS),
        cwd=ROOT,
        env=_env(tfds_dir, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for_step(workdir, 3, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "stopped at step" in out
    stopped = max(r["step"] for r in read_metrics(workdir))
    assert 3 <= stopped < 10
    _run(workdir, tfds_dir, *STEPS, devices=devices)
    # Each start records where it computed, and from which step.
    starts = read_hosts(workdir)
    assert [s["step"] for s in starts] == [0, stopped]
    assert all(s["devices"] == devices and s["platform"] == "cpu" for s in starts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, tfds_dir):
    """Two processes of 2 simulated devices each, as one run; returns process 0's output."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_command(
                workdir,
                *STEPS,
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
    assert "step " not in outputs[1][0]  # only the primary process reports progress
    (start,) = read_hosts(workdir)  # one start, recorded by the primary process only
    assert (start["step"], start["processes"], start["devices"]) == (0, 2, 4)
    return outputs[0][0]


def _check_a_whole_run(workdir, stdout):
    records = read_metrics(workdir)
    assert all("step" in r for r in records)
    assert METRIC_KEYS <= set().union(*records)
    final = _final_eval(workdir)
    assert final["step"] == 10 and final["eval_examples"] == 360
    assert 0.0 <= final["eval_top1"] <= final["eval_top5"] <= 1.0
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert [step for step, _ in eval_times(workdir)] == _eval_steps(workdir)
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == ["10", "5"]
    assert "step 10/10" in stdout and "img/s" in stdout and "ETA" in stdout


def _check_refusal_then_more_steps(workdir, tfds_dir):
    """Another model in the workdir: one short error naming the field, before any compile.
    More steps: the run goes on from step 10 (one line says so), its records add to the
    first run's."""
    other = _run(workdir, tfds_dir, *STEPS, "--config.model.width_multiplier=0.5", check=False)
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.width_multiplier: 0.25 there, 0.5 here" in lines[0]
    assert "new --workdir" in lines[0] and "Traceback" not in other.stderr
    assert [s["step"] for s in read_hosts(workdir)] == [0]  # the refused command: no start
    records = read_metrics(workdir)
    longer = [s for s in STEPS if not s.startswith("--config.num_train_steps")]
    more = _run(workdir, tfds_dir, *longer, "--config.num_train_steps=12")
    assert "resuming with num_train_steps changed from 10 to 12" in more.stdout
    assert "steps 11..12" in more.stdout
    assert [s["step"] for s in read_hosts(workdir)] == [0, 10]
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps[: len(records)] == [r["step"] for r in records]
    assert _final_eval(workdir)["step"] == 12
    # The resumed run's eval is in an events file of its own; both files are read.
    assert [step for step, _ in eval_times(workdir)] == _eval_steps(workdir) == [10, 12]


def test_digits_runs_resume_refuse_and_agree_on_every_layout(tmp_path, tfds_dir):
    """One test, so that the runs it compares are made once: 1 device; 1 process of 4 devices
    stopped with SIGTERM and resumed; 2 processes of 2 devices; then the 1-device workdir
    refuses another model and resumes with more steps."""
    one, four, two = (tmp_path / name for name in ("one", "four", "two"))
    _check_a_whole_run(one, _run(one, tfds_dir, *STEPS).stdout)
    # 4 devices, stopped and resumed: the same training as 1 device, up to rounding.
    _sigterm_then_resume(four, tfds_dir, devices=4)
    np.testing.assert_allclose(
        _train_losses(four)[:COMPARED], _train_losses(one)[:COMPARED], rtol=1e-5
    )
    # 2 processes of 2 devices, uninterrupted: the very same bits as the resumed 4 devices.
    assert "4 devices in 2 processes" in _two_processes(two, tfds_dir)
    losses = _train_losses(two)
    assert len(losses) == 10
    np.testing.assert_array_equal(losses, _train_losses(four))
    # Eval adds its per-batch sums on the host, in another order over 2 processes.
    resumed, whole = _final_eval(four), _final_eval(two)
    assert resumed["eval_top1"] == whole["eval_top1"]
    assert abs(resumed["eval_loss"] - whole["eval_loss"]) <= 1e-6
    data_files = sorted(p.name for p in (two / "checkpoints" / "10" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    _check_refusal_then_more_steps(one, tfds_dir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    config = _config("configs/digits.py")
    config.num_train_steps = 20
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.base_learning_rate = 1e30
    config.warmup_epochs = 0
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    logged = [r for r in read_metrics(tmp_path) if "train_loss" in r]
    assert saved and all(math.isfinite(r["train_loss"]) for r in logged if r["step"] in saved)
    assert max(saved) < 20


def test_batch_that_does_not_divide_over_devices_fails_before_compiling(tmp_path, tfds_dir):
    proc = _run(tmp_path, tfds_dir, "--config.batch_size=66", devices=4, check=False)
    assert proc.returncode == 2
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
    """The ImageNet recipe (bf16, EMA, Nesterov) on mock data, a tiny full-attention model,
    two micro-batches a step."""
    config = _config("configs/imagenet.py", "depth=26,variant=full_attention,width=0.25,window=3")
    config.image_size = 32
    config.batch_size = config.eval_batch_size = 8
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.grad_accum_steps = 2
    config.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=20, as_data_source_fn=_fake_imagenet):
        result = train_lib.train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 2 and result["eval_examples"] == 20
    assert math.isfinite(result["eval_loss"]) and 0 <= result["eval_top1"] <= 1
