"""Compile targets without the hardware: TPU slices and NVIDIA GPUs as JAX compile-only devices.

``parse_topology("v5e:2x2")`` or ``parse_topology("h100:4")`` names a target; ``devices(target)``
makes its devices (``jax.experimental.topologies``) from this host, which needs no accelerator:

- TPU (v4, v5e, v5p, v6e): libtpu (``pip install -e ".[tpu]"``). A one-chip slice is
  ``v5e:1x1`` (one host, one chip).
- NVIDIA GPUs: the CUDA plugin (``pip install -e ".[cuda12-aot]"``) and a
  ``GpuTargetConfigProto`` describing the GPU. XLA's own specs cover the datacenter GPUs; here
  each is written from the GPU's published figures (``GPUS``), the T4 and L4 of Colab included.
  JAX must run on its CPU platform (``JAX_PLATFORMS=cpu``) on a host without a GPU.

Errors a user can make (an unknown name, a missing plugin) are one ``ValueError`` that says what
to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024**3

# HBM per chip, bytes (Cloud TPU's published figures).
TPU_MEMORY = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU's published figures, as XLA's ``GpuDeviceInfoProto`` wants them."""

    description: str
    compute_capability: tuple[int, int]
    cores: int  # streaming multiprocessors
    fpus_per_core: int
    threads_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    l2_cache: int
    memory: int
    bandwidth: int  # bytes / s
    clock_ghz: float


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 2048, 233472, 232448,
                50 * 1024**2, 84942979072, 3352320000000, 1.98),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 2048, 167936, 166912,
                40 * 1024**2, 85899345920, 2039000000000, 1.41),
    "l4": Gpu("NVIDIA L4", (8, 9), 58, 128, 1536, 102400, 101376,
              48 * 1024**2, 24 * GIB, 300000000000, 2.04),
    "t4": Gpu("Tesla T4", (7, 5), 40, 64, 1024, 65536, 65536,
              4 * 1024**2, 16 * GIB, 320000000000, 1.59),
    "v100": Gpu("Tesla V100-SXM2-16GB", (7, 0), 80, 64, 2048, 98304, 98304,
                6 * 1024**2, 16 * GIB, 900000000000, 1.53),
}  # fmt: skip


def gpu_target_config(gpu: Gpu) -> str:
    """``GpuTargetConfigProto`` text for ``gpu`` (CUDA 12.8, cuDNN 9.8)."""
    major, minor = gpu.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_core}
  threads_per_core_limit: {gpu.threads_per_core}
  core_count: {gpu.cores}
  fpus_per_core: {gpu.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {gpu.bandwidth}
  l2_cache_size: {gpu.l2_cache}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 8
}}
device_description_str: "{gpu.description}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``platform`` "tpu" or "cuda", ``kind`` (v5e, h100, ...), the
    topology's shape and its number of chips, and each chip's memory in bytes."""

    name: str
    platform: str
    kind: str
    shape: str
    chips: int
    memory_bytes: int


TOPOLOGY_HELP = (
    "--topology must be a TPU slice (v4:2x2x1, v5e:1x1, v5e:2x2, v5p:2x2x1, v6e:1x1, v6e:2x2, "
    f"...) or GPUs as NAME:COUNT with NAME one of {sorted(GPUS)} (e.g. h100:4)"
)


def parse_topology(text: str) -> Target:
    """``"v5e:2x2"`` or ``"h100:4"`` as a ``Target``; ValueError for anything else."""
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text.strip().lower())
    if not match:
        raise ValueError(f"{TOPOLOGY_HELP}, got {text!r}")
    kind, shape = match.groups()
    if kind in TPU_MEMORY:
        chips = math.prod(int(d) for d in shape.split("x"))
        return Target(text, "tpu", kind, shape, chips, TPU_MEMORY[kind])
    if kind in GPUS and "x" not in shape and int(shape) >= 1:
        return Target(text, "cuda", kind, shape, int(shape), GPUS[kind].memory)
    raise ValueError(f"{TOPOLOGY_HELP}, got {text!r}")


def _quiet_libtpu() -> None:
    """libtpu looks for a TPU VM's metadata server and worker list unless told not to, and
    takes a lock that lets one process at a time hold a TPU (none is held here)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def devices(target: Target) -> list:
    """The target's compile-only devices. ValueError if its plugin is not installed."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        _quiet_libtpu()
        one_chip = {"chips_per_host_bounds": (1, 1, 1)} if target.chips == 1 else {}
        try:
            topology = topologies.get_topology_desc(
                topology_name=f"{target.kind}:{target.shape}", platform="tpu", **one_chip
            )
        except RuntimeError as error:
            if "not installed" in str(error):
                raise ValueError(
                    'compiling for TPU needs libtpu: pip install -e ".[tpu]"'
                ) from None
            raise ValueError(
                f"libtpu does not know the topology {target.name!r}: {error}"
            ) from None
        return list(topology.devices)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda",
            target_config=gpu_target_config(GPUS[target.kind]),
            topology=f"1x1x{target.chips}",
        )
    except Exception as error:  # noqa: BLE001  (the plugin's errors are of several kinds)
        raise ValueError(
            "compiling for NVIDIA GPUs needs the CUDA plugin: "
            f'pip install -e ".[cuda12-aot]" ({type(error).__name__}: {str(error)[:200]})'
        ) from None
    return list(topology.devices)


def device_memory(target: Target, count: int) -> int:
    """Bytes of memory per device when ``target``'s chips show as ``count`` devices (a TPU v4
    chip's two cores are two devices that share its HBM)."""
    return target.memory_bytes * target.chips // count


__all__ = [
    "GPUS",
    "TPU_MEMORY",
    "Target",
    "device_memory",
    "devices",
    "gpu_target_config",
    "parse_topology",
]
