"""Pictures of attention: the visualize command and the heat-map geometry."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sasa_jax.models import ModelSpec, build_model
from sasa_jax.train import config as config_lib
from sasa_jax.train import loop as train_lib
from sasa_jax.visualize import load_image, visualize
from sasa_jax.viz.attention_maps import LayerMaps, attention_maps, window_heatmap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _one_hot_maps(h, w, window, border, tap, dilation=1):
    kh, kw = window
    weights = np.zeros((h, w, 1, kh * kw), np.float32)
    weights[..., tap] = 1.0
    return LayerMaps("layer", weights, window, border, dilation, None)


@pytest.mark.parametrize(
    "border, query, tap, expected",
    [
        ("mask", (3, 3), 0, (2, 2)),  # tap (0, 0) of a 3x3 window: one up, one left
        ("mask", (3, 3), 8, (4, 4)),
        ("zeros", (2, 3), 5, (2, 4)),  # tap (1, 2): same row, one right
        ("clamp", (0, 0), 0, (0, 0)),  # clamped: the window starts at the corner
        ("clamp", (5, 5), 8, (5, 5)),
    ],
)
def test_heatmap_places_the_weight_on_the_contract_position(border, query, tap, expected):
    grid = window_heatmap(_one_hot_maps(6, 6, (3, 3), border, tap), *query, head=0)
    assert grid[expected] == 1.0 and grid.sum() == 1.0


def test_heatmap_drops_taps_outside_the_image():
    grid = window_heatmap(_one_hot_maps(6, 6, (3, 3), "mask", 0), 0, 0, head=0)
    assert grid.sum() == 0.0


def test_heatmap_with_dilation():
    grid = window_heatmap(_one_hot_maps(9, 9, (3, 3), "mask", 8, dilation=2), 4, 4, head=0)
    assert grid[6, 6] == 1.0


def test_a_model_without_attention_is_a_clear_error():
    model = build_model(
        ModelSpec(depth=26, variant="baseline", width_multiplier=0.25, num_classes=10),
        rngs=nnx.Rngs(0),
    )
    model.eval()
    with pytest.raises(ValueError, match="no attention layers"):
        attention_maps(model, np.zeros((32, 32, 3), np.float32))


def test_attention_maps_cover_stem_and_layers():
    model = build_model(
        ModelSpec(
            depth=26, variant="full_attention", width_multiplier=0.25, num_classes=10, window=3
        ),
        rngs=nnx.Rngs(0),
    )
    model.eval()
    maps = attention_maps(model, np.random.default_rng(0).normal(size=(32, 32, 3)))
    assert maps[0].stem_block == 4 and maps[0].weights.shape == (32, 32, 4, 16)
    assert len(maps) == 1 + 8  # the stem and one SASA layer per block of ResNet-26
    for m in maps:
        np.testing.assert_allclose(m.weights.sum(-1), 1.0, atol=1e-5)
    assert all(m.relative is not None for m in maps[1:])


def _visualize(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sasa_jax.visualize", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_visualize_a_tiny_trained_run(tmp_path, monkeypatch):
    """A 2-step digits run (in-process: the picture is the point), then its figure for an
    image file."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = config_lib.from_file(ROOT / "configs" / "digits.py")
    config.num_train_steps = 2
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    own = tmp_path / "digit.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(own)
    out = visualize(str(tmp_path / "run"), str(own), str(tmp_path / "attention.png"))
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) > 300
        assert np.asarray(image.convert("L")).std() > 10  # not blank
    # Without an image: the eval split's first, preprocessed as eval does.
    first = load_image(config, None)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and first.std() > 0


def test_unknown_workdir_is_a_clear_error(tmp_path):
    proc = _visualize(f"--workdir={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and "no such workdir" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run of train.py"):
        visualize(str(tmp_path / "empty"))
