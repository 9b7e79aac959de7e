"""The trainer's train step compiles for TPU (v5e) and H100 from this host: the digits config in
bf16 on four devices, under the trainer's ``shard_map`` and under a plain ``jax.jit`` with a
batch-sharded input (``deterministic_reductions=False``), through ``sasa_jax.aot``'s path."""

from __future__ import annotations

import pathlib

import pytest

from sasa_jax.analysis.compile_report import compile_steps
from sasa_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("deterministic", [True, False], ids=["shard_map", "plain_jit"])
def test_digits_train_step_compiles_in_bf16(platform, deterministic, devices_of):
    config = config_lib.from_file(ROOT / "configs/digits.py")
    config.half_precision = True
    config.deterministic_reductions = deterministic
    (report,) = compile_steps(config, devices_of(platform, 4), 16, steps=("train",))
    # 8 SASA layers in the digits model, each with a forward and a backward kernel on TPU; on a
    # GPU ``auto`` runs the first stage's two (8x8 maps, 5x5 windows) as "tiled".
    assert report.kernels >= (16 if platform == "tpu" else 12)
    assert 0 < report.peak < 2e9
