"""Compiles for TPU and NVIDIA GPUs from this CPU host (no accelerator): the op and train steps
as XLA compiles them for those targets, Pallas kernels included (``sasa_jax.analysis``).

Run in a venv with the accelerator compilers (``pip install -e ".[tpu,cuda12-aot]"``):
``python -m pytest accelerator_tests [--platforms=tpu,cuda]``. A missing compiler fails the
tests (``targets.devices`` raises); nothing is skipped.
"""

from __future__ import annotations

import jax
import pytest

jax.config.update("jax_platforms", "cpu")  # the targets are compile-only devices


def pytest_addoption(parser):
    parser.addoption(
        "--platforms", default="tpu,cuda", help="comma-separated: tpu, cuda (default both)"
    )


def pytest_generate_tests(metafunc):
    if "platform" in metafunc.fixturenames:
        platforms = metafunc.config.getoption("platforms").split(",")
        metafunc.parametrize("platform", platforms)


# The single-device and four-device targets of each platform.
TOPOLOGIES = {"tpu": {1: "v5e:1x1", 4: "v5e:2x2"}, "cuda": {1: "h100:1", 4: "h100:4"}}
# Each platform's Pallas kernel in the compiled program.
KERNEL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.fixture(scope="session")
def devices_of():
    """``devices_of(platform, count)``: compile-only devices, made once per topology."""
    from sasa_jax.analysis import targets

    made = {}

    def get(platform: str, count: int):
        name = TOPOLOGIES[platform][count]
        if name not in made:
            made[name] = targets.devices(targets.parse_topology(name))
        return made[name]

    return get
