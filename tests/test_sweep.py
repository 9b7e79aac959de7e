"""The sweep runner: grid product and cell names, skip-and-resume, failed runs, the results
files; and the cluttered-digits set it is meant for.

Most tests drive the runner with a stand-in train script (it writes a metrics.jsonl row whose
values follow from its arguments, and fails for one cell), so that what the runner does with
runs is checked in seconds; one slow test runs the real ``python -m sasa_jax.train``.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sasa_jax import sweep, train
from sasa_jax.analysis import sweep_results
from sasa_jax.data import digits_clutter
from sasa_jax.train import host

FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, pathlib, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = pathlib.Path(args["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "calls", "a") as f:
        f.write("x")
    window, seed = int(args["config.model.window"]), int(args["config.seed"])
    if os.environ.get("FAKE_STOP"):
        sys.exit(75)  # sasa_jax.train.EXIT_STOPPED: stopped by a signal with a checkpoint
    if window == 7:
        print("ValueError: window 7 is not allowed here")
        sys.exit(2)
    row = {"step": 4, "eval_top1": window / 10 + seed / 100, "eval_loss": 1.0 - seed / 10}
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "train_loss": 2.0}) + "\\n" + json.dumps(row) + "\\n")
    """
)


@pytest.fixture
def fake_train(tmp_path):
    """The stand-in's command after ``python``, as ``sweep.TRAIN`` is ``("-m",
    "sasa_jax.train")``."""
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return (str(path),)


def test_grid_product_cell_names_and_train_arguments(tmp_path):
    runs = sweep.plan(
        "configs/digits.py",
        tmp_path,
        ["model.window=3,5", "model.positional=relative,none"],
        2,
        ["--config.num_train_steps=40"],
    )
    assert len(runs) == 8
    assert [r.cell for r in runs[::2]] == [
        "window=3,positional=relative",
        "window=3,positional=none",
        "window=5,positional=relative",
        "window=5,positional=none",
    ]
    assert [r.seed for r in runs[:2]] == [0, 1]
    assert runs[0].fields == {"model.window": 3, "model.positional": "relative"}
    assert runs[3].workdir == tmp_path / "window=3,positional=none" / "seed1"
    assert runs[3].args == (
        "--config=configs/digits.py",
        f"--workdir={tmp_path / 'window=3,positional=none' / 'seed1'}",
        "--config.num_train_steps=40",
        "--config.model.window=3",
        "--config.model.positional=none",
        "--config.seed=1",
    )


def test_clashing_field_names_keep_their_full_path():
    assert sweep.cell_name({"model.window": 3, "other.window": 5}) == (
        "model.window=3,other.window=5"
    )
    assert sweep.cell_name({}) == "default"


@pytest.mark.parametrize(
    "grids, overrides, message",
    [
        (["model.nope=1,2"], [], "no field 'model.nope'"),
        (["model.window=three"], [], "model.window"),
        (["model.window"], [], "FIELD=V1,V2"),
        (["model.window=3", "model.window=5"], [], "twice"),
        (["model.num_heads=8,7"], [], "num_heads=7"),
        ([], ["--seeds-typo=2"], "unknown argument"),
        ([], ["--config.num_train_steps=x"], "num_train_steps"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tmp_path, grids, overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep.plan("configs/digits.py", tmp_path, grids, 1, overrides)
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="no config file"):
        sweep.plan("configs/nope.py", tmp_path, [], 1, [])


def _sweep(workdir, fake_train, windows="3,5,7", seeds=2):
    runs = sweep.plan("configs/digits.py", workdir, [f"model.window={windows}"], seeds, [])
    return runs, sweep.run_all(runs, train=fake_train)


def test_failed_run_is_reported_and_the_others_finish(tmp_path, fake_train):
    runs, rows = _sweep(tmp_path, fake_train)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"] * 2
    assert rows[1]["metrics"] == {"eval_top1": 0.31, "eval_loss": 0.9}
    assert rows[4]["error"] == "exit 2: ValueError: window 7 is not allowed here"
    assert rows[0]["fields"] == {"model.window": 3} and rows[0]["wall_s"] > 0


def test_a_second_call_runs_nothing_and_changed_runs_resume(tmp_path, fake_train):
    runs, _ = _sweep(tmp_path, fake_train, windows="3,5")
    rows = sweep.run_all(runs, train=fake_train)
    assert [(r.workdir / "calls").read_text() for r in runs] == ["x"] * 4
    assert all(r["status"] == "done" for r in rows)
    # an interrupted run (no record) and a run with other arguments are run again
    (runs[0].workdir / sweep.RECORD).unlink()
    longer = sweep.plan(
        "configs/digits.py", tmp_path, ["model.window=3,5"], 2, ["--config.num_epochs=3"]
    )
    sweep.run_all(longer[:2] + runs[2:], train=fake_train)
    assert [(r.workdir / "calls").read_text() for r in runs] == ["xx", "xx", "x", "x"]


def test_a_run_stopped_by_a_signal_is_not_finished(tmp_path, fake_train, monkeypatch):
    """A run that exits with ``EXIT_STOPPED`` (a signal stopped it with a checkpoint) is
    resumed by the next call."""
    assert train.EXIT_STOPPED == 75
    monkeypatch.setenv("FAKE_STOP", "1")
    runs, rows = _sweep(tmp_path, fake_train, windows="3", seeds=1)
    assert rows[0]["status"] == "stopped" and rows[0]["metrics"] == {}
    assert not sweep.is_finished(runs[0])
    monkeypatch.delenv("FAKE_STOP")
    rows = sweep.run_all(runs, train=fake_train)
    assert rows[0]["status"] == "done" and (runs[0].workdir / "calls").read_text() == "xx"


def test_results_files_hold_every_run_and_the_per_cell_statistics(tmp_path, fake_train):
    _, rows = _sweep(tmp_path, fake_train)
    paths = sweep_results.write(tmp_path, rows)
    saved = json.loads(paths[0].read_text())
    assert len(saved) == 6 and saved[5]["seed"] == 1 and saved[5]["status"] == "failed"
    table = paths[1].read_text().splitlines()
    assert table[0] == "| model.window | eval_top1 | eval_loss | wall s | runs |"
    cell3 = table[2].split(" | ")
    # window 3, seeds 0 and 1: top-1 0.30 and 0.31 -> mean 0.305, sample std 0.00707
    assert cell3[1] == "0.3050 ± 0.0071"
    assert cell3[2] == "0.9500 ± 0.0707"
    assert table[4].endswith("| – | – | – | 0 (2 failed) |")
    assert "window=7/seed1: failed: exit 2: ValueError" in paths[1].read_text()
    with Image.open(paths[2]) as image:
        assert image.format == "PNG" and image.size[1] >= 500  # two metric panels


def test_the_command_line_returns_failure_when_a_run_failed(tmp_path, fake_train, monkeypatch):
    monkeypatch.setattr(sweep, "TRAIN", fake_train)
    code = sweep.main(
        ["--config=configs/digits.py", f"--workdir={tmp_path}", "--grid=model.window=5,7"]
    )
    assert code == 1
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
    with pytest.raises(SystemExit) as exit_:  # --seeds=0 is the user's to fix: status 2
        sweep.main(["--config=configs/digits.py", f"--workdir={tmp_path}", "--seeds=0"])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_a_real_sweep_trains_and_then_skips(tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "sasa_jax.sweep",
        "--config=configs/digits.py:width=0.125,heads=4",
        f"--workdir={workdir}",
        "--grid=base_learning_rate=0.2",  # one run: the wiring (the rest uses the stand-in)
        "--config.num_train_steps=2",
        "--config.eval_batch_size=360",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["cell"] for r in rows] == ["base_learning_rate=0.2"]
    for row in rows:
        assert 0.0 <= row["metrics"]["eval_top1"] <= 1.0
        logged = [json.loads(x) for x in open(f"{row['workdir']}/metrics.jsonl")]
        assert logged[-1]["step"] == 2 and logged[-1]["eval_examples"] == 360
        config = json.loads(open(f"{row['workdir']}/config.json").read())
        assert config["base_learning_rate"] == row["fields"]["base_learning_rate"]
        (start,) = host.read_hosts(row["workdir"])  # the machine, from the run's own record
        assert row["host"] == start["summary"] and start["step"] == 0
    log = pathlib.Path(rows[0]["workdir"]) / "train.log"
    size = log.stat().st_size
    again = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert again.returncode == 0 and "1 finished, 0 to run" in again.stdout
    assert log.stat().st_size == size  # the run was not started again


# ------------------------------------------------------------------- cluttered digits


def test_cluttered_digits_shapes_labels_and_determinism():
    first = list(zip(range(30), digits_clutter.cluttered_digits("test"), strict=False))
    again = list(zip(range(30), digits_clutter.cluttered_digits("test"), strict=False))
    for (_, (a, la)), (_, (b, lb)) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
        assert la == lb and a.shape == (48, 48) and a.dtype == np.uint8
    images, test_labels = digits_clutter._digits(True)
    assert [label for _, (_, label) in first] == list(test_labels[:30])
    other = next(digits_clutter.cluttered_digits("test", seed=1))[0]
    assert not np.array_equal(other, first[0][1][0])
    with pytest.raises(ValueError, match="split"):
        next(digits_clutter.cluttered_digits("validation"))


def test_cluttered_digit_is_scaled_up_among_clutter():
    """The digit is drawn 20-34 px: the bright area far exceeds an 8x8 digit's, and clutter
    adds bright pixels away from it (more than the digit alone would give)."""
    rng = np.random.default_rng(0)
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 1.0  # a "1": a bar 6 px tall
    alone = digits_clutter.make_cluttered(rng, digit, np.zeros((3, 8, 8)))
    rows = np.flatnonzero((alone > 128).any(axis=1))
    assert 15 <= rows.max() - rows.min() + 1 <= 27  # 6/8 of 20-34 px
    cluttered = digits_clutter.make_cluttered(rng, digit, np.ones((3, 8, 8)))
    assert (cluttered > 128).sum() > (alone > 128).sum() + 40


def test_cluttered_digits_build_offline(tmp_path, monkeypatch):
    from sasa_jax import data

    monkeypatch.setattr(digits_clutter, "PER_DIGIT", {"train": 1, "test": 1})
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    splits = data.load_dataset("digits_clutter")
    assert (len(splits.train), len(splits.eval), splits.num_classes) == (1437, 360, 10)
    made = {(image.tobytes(), label) for image, label in digits_clutter.cluttered_digits("test")}
    for i in range(0, len(splits.eval), 7):  # TFDS stores records in its own order
        with Image.open(io.BytesIO(splits.eval[i]["image"])) as image:
            pixels = np.asarray(image)
        assert pixels.shape == (48, 48, 3)
        assert (pixels[..., 0].tobytes(), splits.eval[i]["label"]) in made
