"""sasa_jax.analysis.shifts: moves by less than the stem's stride, on constructed cases with
answers by hand and on the real stems."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax import data
from sasa_jax.analysis import shifts
from sasa_jax.models import ModelSpec, build_model

SPEC = ModelSpec(depth=26, variant="full_attention", width_multiplier=0.25, window=3)


def _model(**overrides):
    return build_model(ModelSpec(**{**SPEC.__dict__, **overrides}), rngs=nnx.Rngs(0))


def _digits_like(count=6, size=32):
    """Normalised grey images on a black background, with bright random strokes."""
    rng = np.random.default_rng(0)
    grey = np.zeros((count, size, size, 1), np.uint8)
    inner = size - 12
    grey[:, 6:-6, 6:-6] = rng.integers(0, 2, (count, inner, inner, 1)) * 255
    return data.normalize(grey.repeat(3, -1))


def test_shifted_moves_down_and_right_and_fills_with_each_channels_black():
    images = jnp.arange(2 * 5 * 6 * 2, dtype=jnp.float32).reshape(2, 5, 6, 2) + 1
    images = images.at[..., 1].multiply(-1)  # channel minima 1 and -120
    moved = np.asarray(shifts.shifted(images, 1, 2))
    np.testing.assert_array_equal(moved[:, 1:, 2:], np.asarray(images)[:, :-1, :-2])
    np.testing.assert_array_equal(moved[:, 0, :, 0], 1.0)
    np.testing.assert_array_equal(moved[:, :, :2, 1], -120.0)
    np.testing.assert_array_equal(shifts.shifted(images, 0, 0), images)
    with pytest.raises(ValueError, match=r"\(5, 0\) pixels does not fit 5x6"):
        shifts.shifted(images, 5, 0)


def test_unexplained_is_zero_for_a_local_linear_map_and_one_for_a_new_code():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 10, 10, 4))
    kernel = rng.normal(size=(3, 3, 4, 4))
    resampled = np.zeros_like(base)
    for dy in range(3):
        for dx in range(3):  # a 3x3 convolution of base, plus a bias (borders are left out)
            resampled[:, 1:-1, 1:-1] += base[:, dy : dy + 8, dx : dx + 8] @ kernel[dy, dx]
    assert shifts._unexplained(base, resampled + 0.5) < 1e-12
    assert shifts._unexplained(base, rng.normal(size=base.shape)) > 0.9
    # by hand: |moved - base| / |base| per image, summed over images
    base, moved = np.ones((2, 1, 1, 4)), np.ones((2, 1, 1, 4))
    moved[0] += 1.5
    assert shifts._relative(moved, base) == pytest.approx((3.0 + 0.0) / (2.0 + 2.0))


@pytest.mark.parametrize("variant", ["full_attention", "conv_stem_attention"])
def test_stems_are_equivariant_on_their_own_grid_and_move_between_its_cells(variant):
    """Both stems reduce by 4: moved by 4 px down and right, the output moves by one cell,
    exactly (the border cells left out). Moved by 1-3 px it changes. The model's batch
    statistics are untouched, and it is left in eval mode."""
    model = _model(variant=variant, stem_zero_query=False)
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    images = _digits_like(count=24, size=48)
    assert shifts.stem_stride(model, images) == 4
    change = shifts.stem_shift_change(model, images)
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), before)
    assert model.stem.norm.use_running_average
    assert change["stem_shift_cell"] == pytest.approx(0.0, abs=1e-6)
    for p in (1, 2, 3):
        assert change[f"stem_shift_{p}"] > 0.05
        assert 0.0 <= change[f"stem_shift_{p}_unexplained"] < 1.0
    # 16 channels: 4 x 145 samples to fit, 64 inner cells an image: 10 images, of 20
    with pytest.raises(ValueError, match="at least 20 images .* not 18: raise --shift_images"):
        shifts.stem_shift_change(model, _digits_like(count=18, size=48))
    with pytest.raises(ValueError, match="too small"):
        shifts.stem_shift_change(model, _digits_like(count=24, size=16))


class _BrightestColumn(nnx.Module):
    """Answers (column of the brightest pixel) mod 4: a classifier that sees the phase."""

    def __call__(self, x):
        return jax.nn.one_hot(jnp.argmax(x.max(axis=(1, 3)), -1) % 4, 4)


def test_phase_consistency_counts_the_phases_by_hand():
    """One bright pixel at column c: at phase (dy, dx) the answer is (c + dx) mod 4, so it is
    the unmoved one's at the 3 moved phases with dx = 0 of 15, no image keeps one answer, and
    the top-1 is 1 at dx = 0 and 0 elsewhere."""
    images = np.zeros((3, 12, 12, 3), np.float32)
    columns = np.array([1, 4, 6])
    images[np.arange(3), 5, columns] = 1.0
    result = shifts.phase_consistency(
        _BrightestColumn(), jnp.asarray(images), columns % 4, stride=4
    )
    assert result == pytest.approx(
        {"consistency": 3 / 15, "all_phases": 0.0, "phase_top1_min": 0.0, "phase_top1_max": 1.0}
    )
    with pytest.raises(ValueError, match="no stem to take the stride from"):
        shifts.phase_consistency(_BrightestColumn(), jnp.asarray(images))
