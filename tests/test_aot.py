"""``python -m sasa_jax.aot`` on a host without the accelerator compilers: one clear line and
exit status 2 for a missing plugin, an unknown topology or a bad config, and the topology
names it takes. (The compiles themselves run in accelerator_tests/, in a venv with libtpu and
the CUDA plugin.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from sasa_jax.analysis import targets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _aot(*args):
    return subprocess.run(
        [sys.executable, "-m", "sasa_jax.aot", "--config=configs/digits.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _plugin_missing(platform: str) -> bool:
    import importlib.util

    module = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v5e:2x2", 'compiling for TPU needs libtpu: pip install -e ".[tpu]"'),
        (
            "h100:4",
            'compiling for NVIDIA GPUs needs the CUDA plugin: pip install -e ".[cuda12-aot]"',
        ),
    ],
)
def test_a_missing_compiler_is_one_line_and_exit_2(topology, message):
    assert _plugin_missing(targets.parse_topology(topology).platform), "run in the main venv"
    proc = _aot(f"--topology={topology}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sasa_jax.aot")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_unknown_topology_is_one_line_and_exit_2():
    proc = _aot("--topology=p100:2")
    assert proc.returncode == 2
    assert "--topology must be a TPU slice" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("topology", ["v5e", "h100:0", "p100:2", "v5e:2y2", "h100:2x2"])
def test_unknown_topologies(topology):
    with pytest.raises(ValueError, match="--topology must be a TPU slice"):
        targets.parse_topology(topology)


def test_topology_names():
    tpu = targets.parse_topology("v5e:2x2")
    assert (tpu.platform, tpu.kind, tpu.chips, tpu.memory_bytes) == ("tpu", "v5e", 4, 16 * 2**30)
    assert targets.parse_topology("v4:2x2x1").chips == 4
    assert targets.device_memory(targets.parse_topology("v4:2x2x1"), 8) == 16 * 2**30
    gpu = targets.parse_topology("H100:4")
    assert (gpu.platform, gpu.kind, gpu.chips) == ("cuda", "h100", 4)
    assert gpu.memory_bytes == targets.GPUS["h100"].memory


def test_gpu_target_configs_carry_the_published_figures():
    """The text XLA reads for each GPU: its compute capability, cores and memory."""
    t4 = targets.gpu_target_config(targets.GPUS["t4"])
    assert "major: 7\n    minor: 5" in t4 and "core_count: 40" in t4
    h100 = targets.gpu_target_config(targets.GPUS["h100"])
    assert "major: 9\n    minor: 0" in h100 and "device_memory_size: 84942979072" in h100
