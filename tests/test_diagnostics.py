"""sasa_jax.analysis.diagnostics and python -m sasa_jax.diagnose, on the real models."""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from sasa_jax import data, diagnose
from sasa_jax.analysis import diagnostics
from sasa_jax.models import ModelSpec, build_model
from sasa_jax.tasks import make_task
from sasa_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ModelSpec(depth=26, variant="full_attention", width_multiplier=0.25, window=3)


def _model(**overrides):
    model = build_model(ModelSpec(**{**SPEC.__dict__, **overrides}), rngs=nnx.Rngs(0))
    model.eval()
    return model


def _images():
    return jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def test_zero_query_stem_is_uniform_and_a_random_one_is_not():
    """With W_Q = 0 every stem query weighs its 4x4 block uniformly: entropy 1 and top weight
    1/16 by hand; a random W_Q does not. The stem's input is the images themselves."""
    images = _images()
    stem = diagnostics.attention_stats(_model(), images)["stem/attention"]
    assert stem["entropy"] == pytest.approx(1.0, abs=1e-6)
    assert stem["top"] == pytest.approx(1 / 16, abs=1e-6)
    assert stem["qk_std"] == 0.0
    assert stem["in_rms"] == pytest.approx(float(np.sqrt(np.mean(np.square(images)))), 1e-5)
    random = diagnostics.attention_stats(_model(stem_zero_query=False), images)
    assert random["stem/attention"]["entropy"] < 0.95
    layers = {path for path, _ in diagnostics.attention_layers(_model())}
    assert set(random) == layers and "stages/0/0/spatial" in layers
    for row in random.values():
        assert 0.0 < row["entropy"] <= 1.0 and 0.0 < row["top"] <= 1.0


def test_gradient_ratios_leave_the_batch_statistics_alone():
    config = config_lib.from_file(ROOT / "configs/digits.py", "variant=full_attention")
    task = make_task(config, 10)
    model = task.create_model(0)
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    batch = {
        "image": np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), np.uint8),
        "label": np.arange(4, dtype=np.int32),
    }
    ratios = diagnostics.gradient_ratios(task, model, batch)
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), before)
    assert ratios["head"] > 0 and ratios["stem"] > 0 and ratios["stages/0/0/spatial"] >= 0


def test_effective_rank_counts_the_directions_features_span():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    for k in (1, 3, 16):
        # k uncorrelated directions of equal variance: orthonormal zero-mean columns
        codes = rng.normal(size=(400, k))
        codes = np.linalg.qr(codes - codes.mean(0))[0]
        features = (codes @ basis[:k]).reshape(4, 10, 10, 16) + 3.0
        rank, components = diagnostics.effective_rank(features)
        assert rank == pytest.approx(k, rel=1e-6) and components == k
    assert diagnostics.effective_rank(np.full((2, 5, 5, 16), 2.5)) == (0.0, 0)
    # one direction with 99.9% of the variance: rank near 1, one component holds 99%
    lopsided = np.concatenate([rng.normal(size=(500, 1)) * 30, rng.normal(size=(500, 3))], -1)
    rank, components = diagnostics.effective_rank(lopsided)
    assert 1.0 < rank < 1.1 and components == 1


def test_a_stem_that_sees_only_its_tiles_mean_passes_two_directions():
    """With W_Q = 0 and uniform mixture weights the paper's stem outputs, per channel, an affine
    function of each 4x4 tile's mean grey level; train-mode batch norm makes every channel
    +-z (z: the standardised tile mean), and ReLU leaves relu(z) or relu(-z): at most two
    directions. A random 7x7 conv stem on the same images passes nearly all 16. The model's
    batch statistics are untouched."""
    grey = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), np.uint8).repeat(3, -1)
    images = data.normalize(grey)
    model = _model()
    attention = model.stem.attention
    attention.mixture_emb.set_value(np.zeros_like(attention.mixture_emb[...]))
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    rank = diagnostics.stem_rank(model, images)
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), before)
    assert rank["stem_channels"] == 16 and rank["stem_components"] <= 2
    assert rank["stem_rank"] <= 2.0
    conv = diagnostics.stem_rank(_model(variant="conv_stem_attention"), images)
    assert conv["stem_components"] >= 14 and conv["stem_rank"] > 10


@pytest.mark.slow
def test_diagnose_reads_a_runs_checkpoints(tmp_path, monkeypatch, capsys):
    from sasa_jax.train import loop, restore

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = config_lib.from_file(ROOT / "configs/digits.py", "variant=full_attention")
    config.num_train_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    run = str(tmp_path / "run")
    loop.train_and_evaluate(config, run)
    rows = diagnose.diagnose(run, [2], init=True, images=8, shift_images=80)  # a listed step
    steps = {row["step"] for row in rows}
    assert steps == {0, 2}
    stem = [r for r in rows if r.get("layer") == "stem/attention"]
    assert [r["entropy"] for r in stem if r["step"] == 0] == [pytest.approx(1.0, abs=1e-6)]
    assert all(r["grad_ratio"] > 0 for r in rows if r.get("part") == "head")
    moved = {r["param"]: r["moved"] for r in rows if "param" in r}
    assert {r["step"] for r in rows if "param" in r} == {2}
    assert all(path.startswith("stem/") for path in moved)
    (_, _, _, start), (_, _, _, end) = restore.restored_states(config, run, [2], True)
    for name in ("emb_row", "value_mixture"):
        w0 = np.asarray(start.params["stem"]["attention"][name].get_value())
        w2 = np.asarray(end.params["stem"]["attention"][name].get_value())
        want = np.linalg.norm(w2 - w0) / np.linalg.norm(w0)
        assert moved[f"stem/attention/{name}"] == pytest.approx(want, rel=1e-5) and want > 0
    w_q = end.params["stem"]["attention"]["query"]["kernel"].get_value()  # starts at zero
    assert moved["stem/attention/query/kernel"] == pytest.approx(
        float(np.linalg.norm(w_q)), rel=1e-5
    )
    ranks = {r["step"]: r for r in rows if "stem_rank" in r}
    assert set(ranks) == {0, 2} and all(r["stem_channels"] == 16 for r in ranks.values())
    for r in ranks.values():
        assert 0 < r["stem_rank"] <= 16 and 1 <= r["stem_components"] <= 16
    moves = {r["step"]: r for r in rows if "shift_images" in r}
    assert set(moves) == {0, 2} and all(r["shift_images"] == 80 for r in moves.values())
    for r in moves.values():  # the paper's stem: tiles on its own grid
        assert r["stem_shift_cell"] == pytest.approx(0.0, abs=1e-6) and r["stem_shift_1"] > 0
        assert 0.0 <= r["all_phases"] <= r["consistency"] <= 1.0
        assert r["phase_top1_min"] <= r["phase_top1_max"]
    assert "moved back one cell" in diagnose._format(rows)
    json.dumps(rows)  # what --json prints
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        diagnose.diagnose(run, [3], images=8)
    with pytest.raises(ValueError, match="--shift_images must be 0"):
        diagnose.diagnose(run, [2], shift_images=-1)
    with pytest.raises(ValueError, match="at least 74 images .* not 8: raise --shift_images"):
        diagnose.diagnose(run, [2], images=8, shift_images=8)
