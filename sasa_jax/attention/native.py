"""Exact local attention as a C++ kernel for XLA's CPU backend: the "native" implementation.

XLA's CPU backend compiles the pure-JAX implementations into many small loops and matmuls
with a contraction of only ``dim`` (8 in a ResNet-50 at 56x56), and on this repository's
machines none of them comes within 2x of the 3x3 convolution it replaces at the large stages
("Performance" in the README). ``cpu_kernel.cc`` is the "optimized kernel" the paper says is
missing, for the CPU: one pass over each query's window with the softmax in registers, and a
backward pass that recomputes it. It registers through ``jax.ffi`` as two custom calls and
returns the same numbers as every other implementation (tested against the same reference).

The source ships with the package and is compiled on first use with the machine's C++
compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) against the FFI headers of the
installed jaxlib, into a cache directory (``$SASA_JAX_CACHE``, else ``~/.cache/sasa_jax``),
keyed by the source, the compiler, its flags and the jaxlib version. Where that fails, or with
``SASA_JAX_NATIVE=0``, the implementation is not available and ``auto`` picks a pure-JAX one.

Each custom call is wrapped in ``custom_partitioning`` (under ``jax.jit`` with a batch-sharded
input every device runs the kernel on its own images, instead of XLA's default of gathering the
batch onto every device) and ``custom_vmap`` (``jax.vmap`` maps it one slice at a time).

``return_weights=True`` takes the output from the kernel and the weights from ``gather``'s
windows (the weights path is for pictures, not for training).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from sasa_jax.attention import gather
from sasa_jax.attention.api import Implementation, register
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

SOURCE = "cpu_kernel.cc"
FORWARD_TARGET = "sasa_local_attention_forward"
BACKWARD_TARGET = "sasa_local_attention_backward"
LANES = 8  # (image, head) pairs per vector in the kernel

# The forward pass splits each image's rows into blocks until there are this many work items,
# so that a small batch still spreads over the cores (the backward pass works per image).
MIN_FORWARD_ITEMS = 8

# Most threads one call uses (None: os.cpu_count()); each needs its own scratch slot. The
# results do not depend on it (tests/test_native.py).
MAX_WORKERS: int | None = None


def _cache_dir() -> Path:
    if os.environ.get("SASA_JAX_CACHE"):
        return Path(os.environ["SASA_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sasa_jax"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _x86_flags() -> list[str]:
    """AVX2 and FMA where this CPU has them (the kernel's vectors are 8 floats either way)."""
    flags = ""
    try:
        if platform.system() == "Linux":
            flags = Path("/proc/cpuinfo").read_text()
        elif platform.system() == "Darwin":
            flags = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.lower()
    except OSError:
        return []
    words = set(flags.replace("\n", " ").split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= words else []


def compile_command(compiler: str, source: Path, output: Path) -> list[str]:
    """The command that builds the kernel's shared library."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _x86_flags()
    include = jax.ffi.include_dir()
    return [compiler, *flags, f"-I{include}", str(source), "-o", str(output)]


def _library_path(compiler: str, source: bytes) -> Path:
    """Where the library for this source, compiler, flags and jaxlib lives in the cache."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    probe = compile_command(compiler, Path("src"), Path("out"))
    key = hashlib.sha256()
    for part in (source, version.encode(), " ".join(probe).encode(), jax.__version__.encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"sasa_cpu_kernel_{key.hexdigest()[:20]}.so"


def _build(compiler: str, source: bytes, path: Path) -> None:
    """Compiles into a temporary file and moves it into place (safe for parallel builds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        out = Path(tmp) / path.name
        result = subprocess.run(
            compile_command(compiler, src, out), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:] or "the compiler failed")
        os.replace(out, path)


@functools.cache
def library() -> object | None:
    """The compiled kernel (a ``ctypes.CDLL``) with its FFI targets registered, or None where
    it cannot be built here (a warning says why) or ``SASA_JAX_NATIVE=0``."""
    import ctypes

    if os.environ.get("SASA_JAX_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "sasa_jax: no C++ compiler found; the 'native' kernel is unavailable", stacklevel=2
        )
        return None
    source = resources.files("sasa_jax.attention").joinpath(SOURCE).read_bytes()
    try:
        path = _library_path(compiler, source)
        if not path.exists():
            _build(compiler, source, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"sasa_jax: the 'native' kernel could not be built: {err}", stacklevel=2)
        return None
    jax.ffi.register_ffi_target(
        FORWARD_TARGET, jax.ffi.pycapsule(lib.SasaLocalAttentionForward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        BACKWARD_TARGET, jax.ffi.pycapsule(lib.SasaLocalAttentionBackward), platform="cpu"
    )
    return lib


def available(backend: str) -> bool:
    """The kernel runs on the CPU backend, once it has been built."""
    return backend == "cpu" and library() is not None


# ---------------------------------------------------------------------------------------------
# Static geometry.


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable arg)."""

    rows: tuple[int, int, int, str]  # AxisWindow.spec
    cols: tuple[int, int, int, str]
    has_rel: bool

    def windows(self) -> tuple[AxisWindow, AxisWindow]:
        return axis_window(*self.rows), axis_window(*self.cols)


def _member(win: AxisWindow) -> np.ndarray:
    """Taps in the softmax: all of them under "zeros" (zero keys outside), else those inside."""
    return np.ones_like(win.valid) if win.border == "zeros" else win.valid


def _tables(win: AxisWindow, axis: str) -> dict[str, np.ndarray]:
    return {
        f"{axis}_pos": win.position.astype(np.int64).ravel(),
        f"{axis}_member": _member(win).astype(np.int64).ravel(),
        f"{axis}_rel": win.rel_index.astype(np.int64).ravel(),
    }


def row_span(win: AxisWindow) -> int:
    """Most key rows the kernel keeps at once: from the first row a later query still reaches
    to the last row an earlier one reached (as ``MakeAxis`` in the kernel)."""
    inside = _member(win) & (win.position >= 0) & (win.position < win.size)
    lo = np.where(inside, win.position, win.size).min(axis=1)
    hi = np.where(inside, win.position, -1).max(axis=1)
    lo = np.minimum.accumulate(lo[::-1])[::-1]
    hi = np.maximum.accumulate(hi)
    return int(max(1, (hi - lo + 1).max()))


def _attributes(geometry: Geometry) -> dict[str, np.ndarray | np.int64]:
    rows, cols = geometry.windows()
    return {
        "kh": np.int64(rows.window),
        "kw": np.int64(cols.window),
        "has_rel": np.int64(geometry.has_rel),
        **_tables(rows, "row"),
        **_tables(cols, "col"),
    }


def _workspace(
    geometry: Geometry, q_shape, dim_v: int, rel_lengths: tuple[int, int], backward: bool
) -> jax.ShapeDtypeStruct:
    """The kernel's scratch as an output buffer ``[slots, floats]`` (so XLA counts it as temp
    memory): one slot per worker, the size ``ForwardScratch``/``BackwardScratch`` ask for."""
    rows, cols = geometry.windows()
    batch, _, width, heads, dim = q_shape
    taps_r = int(_member(rows).sum(axis=1).max())
    taps_c = int(_member(cols).sum(axis=1).max())
    ring = row_span(rows) * width * (dim + dim_v)
    if backward:
        vectors = (
            2 * ring
            + 2 * taps_r * taps_c
            + 2 * (taps_r + taps_c)
            + 2 * dim
            + dim_v
            + (rel_lengths[0] + rel_lengths[1]) * (dim // 2)
        )
        items = lane_groups(q_shape)
    else:
        vectors = ring + taps_r * taps_c + taps_r + taps_c + dim + dim_v
        items = lane_groups(q_shape) * _row_blocks(q_shape)
    slots = max(1, min(items, MAX_WORKERS or os.cpu_count() or 1))
    # One spare vector per slot: the kernel rounds the buffer's start up to a vector's alignment.
    return jax.ShapeDtypeStruct((slots, (vectors + 1) * LANES), jnp.float32)


def lane_groups(q_shape) -> int:
    """The kernel's vectors hold 8 (image, head) pairs of the flattened batch: this many."""
    batch, _, _, heads, _ = q_shape
    return math.ceil(batch * heads / LANES)


def _row_blocks(q_shape) -> int:
    return max(1, min(q_shape[1], math.ceil(MIN_FORWARD_ITEMS / lane_groups(q_shape))))


# ---------------------------------------------------------------------------------------------
# The custom calls.


def _forward_call(q, k, v, rel_row, rel_col, geometry: Geometry):
    """``(out, top, total)``: the output, each query's largest logit (log2 units) and the sum
    of 2^(logit - top) over its window."""
    f32 = jnp.float32
    per_query = jax.ShapeDtypeStruct(q.shape[:4], f32)
    results = (
        jax.ShapeDtypeStruct(v.shape, f32),
        per_query,
        per_query,
        _workspace(geometry, q.shape, v.shape[-1], (rel_row.shape[0], rel_col.shape[0]), False),
    )
    out, top, total, _ = jax.ffi.ffi_call(FORWARD_TARGET, results)(
        q,
        k,
        v,
        rel_row,
        rel_col,
        row_blocks=np.int64(_row_blocks(q.shape)),
        **_attributes(geometry),
    )
    return out, top, total


def _backward_call(q, k, v, d_out, top, total, delta, rel_row, rel_col, geometry: Geometry):
    """``(dq, dk, dv, d_row, d_col)``; the table gradients summed over the batch."""
    f32 = jnp.float32
    groups = lane_groups(q.shape)
    half = rel_row.shape[1]
    lengths = (rel_row.shape[0], rel_col.shape[0])
    results = (
        jax.ShapeDtypeStruct(q.shape, f32),
        jax.ShapeDtypeStruct(k.shape, f32),
        jax.ShapeDtypeStruct(v.shape, f32),
        jax.ShapeDtypeStruct((groups, lengths[0], half), f32),
        jax.ShapeDtypeStruct((groups, lengths[1], half), f32),
        _workspace(geometry, q.shape, v.shape[-1], lengths, True),
    )
    dq, dk, dv, d_row, d_col, _ = jax.ffi.ffi_call(BACKWARD_TARGET, results)(
        q, k, v, d_out, top, total, delta, rel_row, rel_col, **_attributes(geometry)
    )
    return dq, dk, dv, d_row.sum(axis=0), d_col.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Sharding and vmap. A custom call is opaque to XLA's SPMD partitioner, which would gather a
# batch-sharded input onto every device and run the whole batch there. Each call is wrapped so
# that under ``jax.jit`` with a sharded batch every device runs the kernel on its own images
# (the table gradients, sums over the batch, are then summed over the batch's mesh axes), and
# so that ``jax.vmap`` maps it over the vmapped axis one slice at a time.


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
    """The mesh axes that split the leading (batch) dimension, or None."""
    spec = getattr(sharding, "spec", ())
    return spec[0] if len(spec) else None


def _sharding_rule(arg_ranks, batched_args, result_ranks, batched_results):
    """Shardy's rule as a string and the factors that must stay whole: a batch factor ``b``
    shared by the batched operands and results, and a factor of its own for every other
    dimension."""
    whole: list[str] = []

    def operand(tag: str, rank: int, batched: bool) -> str:
        dims = [f"{tag}{i}" for i in range(1 if batched else 0, rank)]
        whole.extend(dims)
        return " ".join((["b"] if batched else []) + dims)

    ins = [
        operand(f"in{j}d", r, b)
        for j, (r, b) in enumerate(zip(arg_ranks, batched_args, strict=True))
    ]
    outs = [
        operand(f"out{j}d", r, b)
        for j, (r, b) in enumerate(zip(result_ranks, batched_results, strict=True))
    ]
    return ", ".join(ins) + " -> " + ", ".join(outs), tuple(whole)


def _per_image(call, geometry, arg_ranks, batched_args, result_ranks, batched_results):
    """``call(*arrays, geometry)`` as a function of the arrays that XLA partitions over the
    batch and ``jax.vmap`` maps over: ``batched_args``/``batched_results`` say which arrays
    lead with the batch (the others are replicated; an unbatched result is a sum over the
    batch)."""

    def local(*args):
        return call(*args, geometry)

    def shardings(mesh, axes, batched):
        split = NamedSharding(mesh, PartitionSpec(axes))
        whole = NamedSharding(mesh, PartitionSpec())
        return tuple(split if b else whole for b in batched)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        axes = _batch_axes(arg_shapes[0].sharding)
        arg_shardings = shardings(mesh, axes, batched_args)
        result_shardings = shardings(mesh, axes, batched_results)

        def lower(*args):
            outs = local(*args)
            if axes is None:
                return outs
            return tuple(
                o if b else jax.lax.psum(o, axes)
                for o, b in zip(outs, batched_results, strict=True)
            )

        return mesh, lower, result_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(mesh, _batch_axes(arg_shapes[0].sharding), batched_results)

    rule, whole_factors = _sharding_rule(arg_ranks, batched_args, result_ranks, batched_results)
    sharded = custom_partitioning(local)
    sharded.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=whole_factors,
    )

    @jax.custom_batching.custom_vmap
    def op(*args):
        return sharded(*args)

    @op.def_vmap
    def _(axis_size, in_batched, *args):
        del axis_size
        mapped = tuple(a for a, b in zip(args, in_batched, strict=True) if b)

        def one(slices):
            it = iter(slices)
            return op(*(next(it) if b else a for a, b in zip(args, in_batched, strict=True)))

        return jax.lax.map(one, mapped), (True,) * len(batched_results)

    return op


@functools.cache
def _forward_op(geometry: Geometry):
    return _per_image(
        _forward_call, geometry, (5, 5, 5, 2, 2), (1, 1, 1, 0, 0), (5, 4, 4), (1, 1, 1)
    )


@functools.cache
def _backward_op(geometry: Geometry):
    return _per_image(
        _backward_call,
        geometry,
        (5, 5, 5, 5, 4, 4, 4, 2, 2),
        (1, 1, 1, 1, 1, 1, 1, 0, 0),
        (5, 5, 5, 2, 2),
        (1, 1, 1, 0, 0),
    )


# ---------------------------------------------------------------------------------------------
# The gradient.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, rel_row, rel_col, geometry: Geometry):
    return _forward_op(geometry)(q, k, v, rel_row, rel_col)[0]


def _attend_fwd(q, k, v, rel_row, rel_col, geometry: Geometry):
    out, top, total = _forward_op(geometry)(q, k, v, rel_row, rel_col)
    return out, (q, k, v, rel_row, rel_col, out, top, total)


def _attend_bwd(geometry: Geometry, residuals, d_out):
    q, k, v, rel_row, rel_col, out, top, total = residuals
    delta = jnp.sum(d_out * out, axis=-1)  # [b, h, w, heads]
    dq, dk, dv, d_row, d_col = _backward_op(geometry)(
        q, k, v, d_out, top, total, delta, rel_row, rel_col
    )
    if not geometry.has_rel:
        return dq, dk, dv, jnp.zeros_like(rel_row), jnp.zeros_like(rel_col)
    return dq, dk, dv, d_row, d_col


_attend.defvjp(_attend_fwd, _attend_bwd)


def _run(q, k, v, rel_row, rel_col, rows: AxisWindow, cols: AxisWindow) -> Array:
    """The kernel's output for checked arguments, in v's dtype (float32 inside)."""
    has_rel = rel_row is not None
    f32 = jnp.float32
    if has_rel:
        tables = (rel_row.astype(f32), rel_col.astype(f32))
    else:  # placeholders: the kernel reads no table without relative logits
        tables = (jnp.zeros((1, 1), f32), jnp.zeros((1, 1), f32))
    geometry = Geometry(rows.spec, cols.spec, has_rel)
    out = _attend(q.astype(f32), k.astype(f32), v.astype(f32), *tables, geometry)
    return out.astype(v.dtype)


def native_attention(q, k, v, rel_row, rel_col, rows, cols, return_weights):
    """``local_attention`` by the C++ kernel; arguments are already checked."""
    out = _run(q, k, v, rel_row, rel_col, rows, cols)
    if not return_weights:
        return out
    _, weights = gather.gather_attention(q, k, v, rel_row, rel_col, rows, cols, True)
    return out, weights


def native_block_attention(q, k, v, rel_row, rel_col, rows, cols):
    """``block_attention`` on the whole map: the kernel takes any window tables, and a block's
    are a "clamp" window's with the block's start, so no tiles are cut or put back."""
    return _run(q, k, v, rel_row, rel_col, rows, cols)


register(
    Implementation("native", native_attention, available=available, blocks=native_block_attention)
)

__all__ = [
    "Geometry",
    "available",
    "compile_command",
    "library",
    "native_attention",
    "native_block_attention",
    "row_span",
]
