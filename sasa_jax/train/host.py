"""Where a run computed: ``WORKDIR/hosts.jsonl``, one line per start of ``train.py``.

The same seed and config give the same bits on the same kind of machine, not across kinds
(docs/determinism.md: a 9-point difference after 6 epochs between two CPUs; XLA compiling for
each host's instruction set is the likeliest cause), and training amplifies that. Each start
(a fresh run, or a resume) appends the step it started from, the date, the JAX versions, the
devices, and the CPU's model and the vector extensions XLA may use, so a result can be traced
to the machine that produced it. ``python -m sasa_jax.sweep`` copies the last start's
``summary`` into each row of its results.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
from typing import Any

import jax

from sasa_jax.train.metrics import read_jsonl

HOSTS_FILE = "hosts.jsonl"
# The CPU features that change what XLA:CPU and the native kernel compile to.
VECTOR_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "asimd",
    "sve",
    "sve2",
)


def cpuinfo(path: str | pathlib.Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU's model name and feature words (x86 ``flags``, Arm ``Features``) from Linux's
    cpuinfo; the model from ``platform.processor()`` where the file has none or is missing."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError:
        return platform.processor(), set()
    model, words = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            words |= set(value.split())
    return model or platform.processor(), words


def describe() -> dict[str, Any]:
    """This process's machine: ``cpu`` (model, cores, architecture and the
    ``VECTOR_FEATURES`` it has), ``jax``/``jaxlib`` versions, ``platform``, ``device_kind``,
    ``devices``, ``processes``, and a one-line ``summary`` of them."""
    model, words = cpuinfo()
    device = jax.devices()[0]
    cpu = {
        "model": model,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "features": [f for f in VECTOR_FEATURES if f in words],
    }
    info = {
        "cpu": cpu,
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    info["summary"] = (
        f"{model} ({cpu['machine']}, {cpu['cores']} cores; {' '.join(cpu['features']) or '-'}); "
        f"{info['devices']} x {info['device_kind']}; jax {info['jax']}"
    )
    return info


def record_start(workdir: str | pathlib.Path, step: int) -> dict[str, Any]:
    """Appends this start's line (``step``: the step it resumed from, 0 for a fresh run;
    ``date``; and ``describe()``) to ``workdir/hosts.jsonl`` and returns it."""
    entry = {
        "step": int(step),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **describe(),
    }
    path = pathlib.Path(workdir) / HOSTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_hosts(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every start recorded in ``workdir/hosts.jsonl``, oldest first ([] without the file)."""
    path = pathlib.Path(workdir) / HOSTS_FILE
    return read_jsonl(path) if path.is_file() else []


def last_summary(workdir: str | pathlib.Path) -> str:
    """The one-line ``summary`` of the machine a run last started on, or '' without a record."""
    starts = read_hosts(workdir)
    return starts[-1]["summary"] if starts else ""
