"""Shared by the whole suite: how XLA compiles, and one compilation cache per run.

Most of the suite's time is XLA compiling small programs. Before the xdist workers start, the
controller process exports, for the workers and every ``train.py`` or ``python -c``
subprocess they launch:

- a persistent compilation cache, one directory per pytest run
  (``$SASA_TEST_COMPILATION_CACHE`` to reuse one between runs): a program compiled by one
  process is read back by the others instead of being compiled again, down to the single
  operations a model's eager initialisation compiles (about 3 s of each ``train.py`` start);
- two XLA settings for quicker CPU compiles: ``--xla_backend_optimization_level=0`` (LLVM's
  optimisation passes off, a third off the compile times) and
  ``--xla_cpu_use_fusion_emitters=false`` (XLA's older loop emitters for fused operations,
  about a third off again; XLA from jaxlib 0.11.1 on has only the newer emitters and no such
  flag, so it is left out there). Neither changes an operation's semantics; results may differ
  in the last bits, and the tests compare numbers within float rounding, or runs made with the
  same settings.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_MADE: list[str] = []


def _compile_flags() -> tuple[str, ...]:
    """The XLA flags above that the installed jaxlib knows: XLA exits on an unknown one."""
    import jaxlib

    flags = ("--xla_backend_optimization_level=0",)
    if tuple(int(part) for part in jaxlib.__version__.split(".")[:3]) < (0, 11, 1):
        flags += ("--xla_cpu_use_fusion_emitters=false",)
    return flags


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # workers inherit the controller's environment
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in _compile_flags():
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    cache = os.environ.get("SASA_TEST_COMPILATION_CACHE")
    if not cache:
        cache = tempfile.mkdtemp(prefix="sasa_xla_cache_")
        _MADE.append(cache)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    for path in _MADE:
        shutil.rmtree(path, ignore_errors=True)


# The longest tests (whole training runs and the notebook), started first so that the two
# workers end together rather than one of them finishing alone.
LONG = ("test_train.py", "test_notebook.py", "test_visualize_a_tiny_trained_run", "test_export.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONG))


def _register_pallas_tpu_interpreted():
    """The TPU kernels' layout (``pallas_tpu``) in Pallas interpret mode, as an implementation
    of its own for the tests ("pallas" on CPU interprets the GPU layout)."""
    from sasa_jax.attention import pallas_tpu, registry

    def forward(q, k, v, rel_row, rel_col, rows, cols, platform):
        return pallas_tpu.forward(q, k, v, rel_row, rel_col, rows, cols, interpret=True)

    def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform):
        return pallas_tpu.backward(
            q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, interpret=True
        )

    registry.register(
        registry.Implementation(
            "pallas_tpu_interpret",
            kernel=registry.Kernel(forward, backward),
            available=lambda backend: False,
            callable_on=("cpu",),
        )
    )


_register_pallas_tpu_interpreted()
