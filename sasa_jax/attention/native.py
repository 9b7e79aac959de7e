"""Exact local attention as a C++ kernel for XLA's CPU backend: the "native" implementation.

XLA's CPU backend compiles the pure-JAX implementations into many small loops and matmuls
with a contraction of only ``dim`` (8 in a ResNet-50 at 56x56), and none of them comes within
2x of the 3x3 convolution it replaces at the large stages (docs/performance.md).
``cpu_kernel.cc`` is the "optimized kernel" the paper says is missing, for the CPU: one pass
over each query's window with the softmax in registers, and a backward pass that recomputes
it (its header describes the layout and numerics). It registers through ``jax.ffi`` as two
custom calls (``native_build``) and returns the same numbers as every other implementation.

It is the CPU lowering of the op's primitive (``dispatch``): ``forward`` returns the output
and the log-sum-exp, ``backward`` the gradients from them; over several devices each runs on its
own images (``per_device``). Its scratch is an output buffer, so XLA counts it as temp
memory; its shape comes from the kernel's own ``SasaWorkspace``, the function the kernel uses
to split its work.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.attention import native_build
from sasa_jax.attention.registry import Implementation, Kernel, register, registered
from sasa_jax.attention.windows import AxisWindow, axis_window

Array = jax.Array

# Most threads one call uses (None: os.cpu_count()); each needs its own scratch slot. The
# results do not depend on it (tests/test_native.py).
MAX_WORKERS: int | None = None


def available(backend: str) -> bool:
    """Offered on the CPU of a CPU host where a compiler is found (nothing is built to say
    so); not once a build has failed. A GPU or TPU host's CPU platform gets pure JAX."""
    if backend != "cpu" or jax.default_backend() != "cpu" or not native_build.can_build():
        return False
    return not native_build.attempted() or native_build.library() is not None


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable arg)."""

    rows: tuple[int, int, int, str]  # AxisWindow.spec
    cols: tuple[int, int, int, str]
    has_rel: bool
    has_key: bool
    workers: int

    def windows(self) -> tuple[AxisWindow, AxisWindow]:
        return axis_window(*self.rows), axis_window(*self.cols)

    def tables(self) -> dict[str, np.ndarray]:
        """Each axis's window taps as the kernel takes them: position, membership, table row."""
        out = {}
        for axis, win in zip(("row", "col"), self.windows(), strict=True):
            out[f"{axis}_pos"] = win.position.astype(np.int64).ravel()
            out[f"{axis}_member"] = win.member.astype(np.int64).ravel()
            out[f"{axis}_rel"] = win.rel_index.astype(np.int64).ravel()
        return out

    def attributes(self) -> dict[str, np.ndarray | np.int64]:
        rows, cols = self.windows()
        return {
            "kh": np.int64(rows.window),
            "kw": np.int64(cols.window),
            "has_rel": np.int64(self.has_rel),
            "has_key": np.int64(self.has_key),
            "workers": np.int64(self.workers),
            **self.tables(),
        }


def workspace_shape(
    geometry: Geometry, q_shape, dim_v: int, rel_lengths: tuple[int, int], backward: bool
) -> tuple[int, int]:
    """``(slots, floats per slot)`` of a call's scratch, as the kernel computes it."""
    rows, cols = geometry.windows()
    batch, height, width, heads, dim = q_shape
    shape = np.array(
        [batch, height, width, heads, dim, dim_v, rows.window, cols.window]
        + [geometry.has_rel, geometry.has_key, *rel_lengths, geometry.workers],
        dtype=np.int64,
    )
    tables = geometry.tables()
    names = ("row_pos", "row_member", "row_rel", "col_pos", "col_member", "col_rel")
    arrays = [np.ascontiguousarray(tables[n]) for n in names]
    result = np.zeros(2, dtype=np.int64)
    pointer = ctypes.POINTER(ctypes.c_int64)
    status = native_build.library().SasaWorkspace(
        ctypes.c_int64(int(backward)),
        shape.ctypes.data_as(pointer),
        *(a.ctypes.data_as(pointer) for a in arrays),
        result.ctypes.data_as(pointer),
    )
    if status != 0:
        raise ValueError(f"the kernel rejects this geometry: {geometry}, q {q_shape}")
    return int(result[0]), int(result[1])


def _workspace(geometry, q_shape, dim_v, rel_lengths, backward) -> jax.ShapeDtypeStruct:
    shape = workspace_shape(geometry, q_shape, dim_v, rel_lengths, backward)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# ---------------------------------------------------------------------------------------------
# The custom calls.


def _forward_call(q, k, v, rel_row, rel_col, geometry: Geometry):
    """``(out, top, total)``: the output, each query's largest logit (log2 units) and the sum
    of 2^(logit - top) over its window."""
    f32 = jnp.float32
    per_query = jax.ShapeDtypeStruct(q.shape[:4], f32)
    lengths = (rel_row.shape[0], rel_col.shape[0])
    results = (
        jax.ShapeDtypeStruct(v.shape, f32),
        per_query,
        per_query,
        _workspace(geometry, q.shape, v.shape[-1], lengths, backward=False),
    )
    out, top, total, _ = jax.ffi.ffi_call(native_build.FORWARD_TARGET, results)(
        q, k, v, rel_row, rel_col, **geometry.attributes()
    )
    return out, top, total


def _backward_call(q, k, v, d_out, lse, rel_row, rel_col, geometry: Geometry):
    """``(dq, dk, dv, d_row, d_col)``; the table gradients summed over the batch. Without
    keys ``dk`` is not written (the caller drops it)."""
    f32 = jnp.float32
    lengths = (rel_row.shape[0], rel_col.shape[0])
    workspace = _workspace(geometry, q.shape, v.shape[-1], lengths, backward=True)
    groups = -(-q.shape[0] * q.shape[3] // 8)  # lane groups: the kernel's per-group tables
    half = rel_row.shape[1]
    results = (
        jax.ShapeDtypeStruct(q.shape, f32),
        jax.ShapeDtypeStruct(k.shape, f32),
        jax.ShapeDtypeStruct(v.shape, f32),
        jax.ShapeDtypeStruct((groups, lengths[0], half), f32),
        jax.ShapeDtypeStruct((groups, lengths[1], half), f32),
        workspace,
    )
    dq, dk, dv, d_row, d_col, _ = jax.ffi.ffi_call(native_build.BACKWARD_TARGET, results)(
        q, k, v, d_out, lse, rel_row, rel_col, **geometry.attributes()
    )
    return dq, dk, dv, d_row.sum(axis=0), d_col.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# The primitive's passes.

LN2 = float(np.log(2.0))


def _geometry(q, k, rel_row, rows: AxisWindow, cols: AxisWindow) -> Geometry:
    workers = MAX_WORKERS or os.cpu_count() or 1
    return Geometry(rows.spec, cols.spec, rel_row is not None, k is not None, workers)


def _operands(q, k, v, rel_row, rel_col):
    """float32 operands of the custom calls, with stand-ins for what is absent: ``q`` for
    the keys (not read) and 1x1 zero tables (not read)."""
    f32 = jnp.float32
    q32 = q.astype(f32)
    keys = q32 if k is None else k.astype(f32)
    if rel_row is None:
        rel_row = rel_col = jnp.zeros((1, 1), f32)
    return q32, keys, v.astype(f32), rel_row.astype(f32), rel_col.astype(f32)


def forward(q, k, v, rel_row, rel_col, rows, cols, platform):
    """The output and each query's log-sum-exp (natural log)."""
    geometry = _geometry(q, k, rel_row, rows, cols)
    out, top, total = _forward_call(*_operands(q, k, v, rel_row, rel_col), geometry)
    return out.astype(v.dtype), (top + jnp.log2(total)) * LN2


def backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform):
    """The gradients from the log-sum-exp, which gives the kernel each weight as one exp2; it
    forms ``dO . out`` from the weights itself, so ``out`` is not read."""
    del out
    geometry = _geometry(q, k, rel_row, rows, cols)
    q32, keys, v32, row32, col32 = _operands(q, k, v, rel_row, rel_col)
    d_out = d_out.astype(jnp.float32)
    dq, dk, dv, d_row, d_col = _backward_call(
        q32, keys, v32, d_out, lse.astype(jnp.float32), row32, col32, geometry
    )
    return (
        dq.astype(q.dtype),
        None if k is None else dk.astype(k.dtype),
        dv.astype(v.dtype),
        None if rel_row is None else d_row.astype(rel_row.dtype),
        None if rel_row is None else d_col.astype(rel_col.dtype),
    )


def _fallback_forward(q, k, v, rel_row, rel_col, rows, cols, platform):
    """Where the kernel failed to build (a warning said why): "tiled" (``available`` is
    False from then on, so "auto" no longer picks "native")."""
    return registered("tiled").kernel.forward(q, k, v, rel_row, rel_col, rows, cols, platform)


def _forward(*args):
    if native_build.library() is None:
        return _fallback_forward(*args)
    return forward(*args)


def _backward(*args):
    if native_build.library() is None:
        return registered("tiled").kernel.backward(*args)
    return backward(*args)


register(Implementation("native", kernel=Kernel(_forward, _backward), available=available))

__all__ = ["Geometry", "available", "backward", "forward", "workspace_shape"]
