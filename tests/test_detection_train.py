"""Detection through the shared trainer: a few steps on the bundled scenes, a COCO-format
folder and a prepared COCO 2017, with COCO metrics in metrics.jsonl; a run restarted from its
half-way checkpoint ends with the same weights and the same eval_ap.

The model is tiny (ResNet-26 at widths x0.25, FPN of 16 channels, one head layer) and every
run is in-process, so the suite's compilation cache compiles each program once.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from sasa_jax import evaluate, visualize
from sasa_jax.data import coco_folder, detection_builders
from sasa_jax.detection.coco_eval import METRICS
from sasa_jax.train import config as config_lib
from sasa_jax.train import loop as train_lib
from sasa_jax.train.metrics import read_metrics
from sasa_jax.train.restore import load_run
from tests import coco_fixtures

pytestmark = pytest.mark.slow
TINY = "fpn_width=16,head_depth=1,window=3"


def _tiny(config, steps: int):
    config.image_size = 128
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 5
    config.log_every_steps = 1
    config.model.depth = 26
    config.model.width_multiplier = 0.25
    return config


def _final_eval(workdir):
    return [m for m in read_metrics(workdir) if "eval_ap" in m][-1]


def test_digit_scenes_train_and_resume_from_half_way(tmp_path, monkeypatch):
    monkeypatch.setattr(detection_builders, "SCENES", {"train": 16, "test": 6})
    config = _tiny(config_lib.from_file("configs/digits_detection.py", TINY), steps=4)
    config.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    result = train_lib.train_and_evaluate(config, str(workdir))
    first = _final_eval(workdir)
    assert set(METRICS) <= set(first) and first["eval_examples"] == 6
    assert all(-1.0 <= first[name] <= 1.0 for name in METRICS)
    for name in ("train_loss", "train_class_loss", "train_box_loss", "train_positives"):
        assert np.isfinite(result[name]), name
    assert result["train_positives"] > 0
    _, model, step = load_run(str(workdir))
    weights = jax.tree.leaves(jax.tree.map(np.asarray, model.backbone.stages))
    assert step == 4

    picture = visualize.visualize(str(workdir))
    assert picture.endswith("detections.png") and os.path.getsize(picture) > 10_000
    again = evaluate.evaluate_run(str(workdir))["metrics"]  # the COCO metrics again, to the bit
    assert {name: again[name] for name in METRICS} == {name: first[name] for name in METRICS}

    shutil.rmtree(workdir / "checkpoints" / "4")  # as if stopped after the step-2 checkpoint
    train_lib.train_and_evaluate(config, str(workdir))
    assert _final_eval(workdir) == first
    _, again, _ = load_run(str(workdir))
    for a, b in zip(
        weights, jax.tree.leaves(jax.tree.map(np.asarray, again.backbone.stages)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_coco_folder_config_trains_and_evaluates(tmp_path):
    folder = tmp_path / "folder"
    coco_fixtures.make_coco_folder(folder, train=8, val=3)
    config = config_lib.from_file("configs/coco_folder.py", f"{folder},{TINY}")
    stats = coco_folder.folder_statistics(folder)
    assert config.model.num_classes == 3 and config.image_size == stats["image_size"]
    assert config.detection.max_boxes == stats["max_objects"]
    # P3 anchors at the 5th-percentile object, but at least twice the stride, forced matches
    assert config.detection.anchor_size == min(4.0, max(2.0, stats["small_object"] / 8))
    assert config.detection.force_match
    config = _tiny(config, steps=2)
    config.data_dir = str(tmp_path / "tfds")
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert _final_eval(tmp_path / "run")["eval_examples"] == 3


def test_coco_config_trains_on_prepared_coco(tmp_path):
    coco_fixtures.make_coco_folder(tmp_path / "folder", train=4, val=2)
    coco_fixtures.Coco2017(
        source=tmp_path / "folder", data_dir=str(tmp_path / "tfds")
    ).download_and_prepare(file_format="array_record")
    config = config_lib.from_file(
        "configs/coco.py", f"variant=full_attention,heads=attention,{TINY}"
    )
    config = _tiny(config, steps=2)
    config.data_dir = str(tmp_path / "tfds")
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert _final_eval(tmp_path / "run")["eval_examples"] == 2
