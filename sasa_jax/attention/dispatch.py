"""The op as two JAX primitives, forward and backward, lowered per platform.

``attention`` binds one primitive per call. Its lowering rule for each platform (cpu, cuda,
rocm, tpu) runs the implementation chosen for that platform (``Static.choices``), so one traced
function carries the C++ kernel when it is lowered for the CPU, the Triton kernel for CUDA and
the Mosaic kernel for TPU -- and only the lowering platform's implementation is ever traced:
tracing costs one primitive, whatever the platforms. ``jax.export`` for several platforms
lowers each platform's rule.

An implementation takes part through its ``Kernel``: a forward pass that returns the output
and each query's log-sum-exp ``[b, H, W, heads]`` (float32, natural log), and a backward pass
that takes them back (flash-attention style: nothing else is saved). The gradient is a
``custom_vjp`` over the two primitives. ``jax.vmap`` maps a call over the vmapped axis one
slice at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import dispatch as _jax_dispatch  # no public API for the set below
from jax.extend import core
from jax.interpreters import batching, mlir

from sasa_jax.attention.windows import axis_window

Array = jax.Array

# The lowering platforms and the JAX backend whose choice each one takes.
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An implementation's passes for the primitives.

    ``forward(q, k, v, rel_row, rel_col, rows, cols, platform) -> (out, lse)`` and
    ``backward(q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, platform) -> (dq, dk,
    dv, d_rel_row, d_rel_col)``, with ``k`` and the tables None when absent (their gradients
    None too), ``rows``/``cols`` the ``AxisWindow`` of each axis (any border, or ``BLOCKS``)
    and ``platform`` the lowering platform.
    """

    forward: Callable[..., tuple[Array, Array]]
    backward: Callable[..., tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class Static:
    """The static parameters of one call: window specs, what is present, and the
    implementation chosen for each backend (``(backend, name)`` pairs)."""

    rows: tuple[int, int, int, str]
    cols: tuple[int, int, int, str]
    has_key: bool
    has_rel: bool
    choices: tuple[tuple[str, str], ...]

    def kernel(self, platform: str) -> Kernel:
        from sasa_jax.attention.api import registered

        return registered(dict(self.choices)[PLATFORMS[platform]]).kernel

    def unpack(self, k, rel_row, rel_col):
        """The placeholders of absent arguments back to None."""
        k = k if self.has_key else None
        return (k, rel_row, rel_col) if self.has_rel else (k, None, None)


attention_p = core.Primitive("sasa_attention")
attention_p.multiple_results = True
attention_bwd_p = core.Primitive("sasa_attention_bwd")
attention_bwd_p.multiple_results = True


def _forward_abstract(q, k, v, rel_row, rel_col, *, static: Static):
    return (
        jax.core.ShapedArray(v.shape, v.dtype),
        jax.core.ShapedArray(q.shape[:4], jnp.float32),
    )


def _backward_abstract(q, k, v, rel_row, rel_col, out, lse, d_out, *, static: Static):
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v, rel_row, rel_col))


def _forward_rule(platform: str):
    def forward(q, k, v, rel_row, rel_col, *, static: Static):
        rows, cols = axis_window(*static.rows), axis_window(*static.cols)
        k, rel_row, rel_col = static.unpack(k, rel_row, rel_col)
        return static.kernel(platform).forward(q, k, v, rel_row, rel_col, rows, cols, platform)

    return mlir.lower_fun(forward, multiple_results=True)


def _backward_rule(platform: str):
    def backward(q, k, v, rel_row, rel_col, out, lse, d_out, *, static: Static):
        rows, cols = axis_window(*static.rows), axis_window(*static.cols)
        key, row, col = static.unpack(k, rel_row, rel_col)
        grads = static.kernel(platform).backward(
            q, key, v, row, col, out, lse, d_out, rows, cols, platform
        )
        placeholders = (q, k, v, rel_row, rel_col)
        return [
            jnp.zeros_like(p) if g is None else g.astype(p.dtype)
            for g, p in zip(grads, placeholders, strict=True)
        ]

    return mlir.lower_fun(backward, multiple_results=True)


def _eager(primitive):
    def impl(*args, **params):
        return jax.jit(lambda *a: primitive.bind(*a, **params))(*args)

    return impl


for _primitive, _abstract, _rule in (
    (attention_p, _forward_abstract, _forward_rule),
    (attention_bwd_p, _backward_abstract, _backward_rule),
):
    _primitive.def_abstract_eval(_abstract)
    _primitive.def_impl(_eager(_primitive))
    for _platform in PLATFORMS:
        mlir.register_lowering(_primitive, _rule(_platform), platform=_platform)


def _batching(primitive, outputs: int):
    """vmap: the call runs once per slice of the vmapped axis (a ``lax.map``), the arguments
    without that axis shared."""

    def rule(args, dims, **params):
        moved = [jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True) if d is not None]

        def one(slices):
            it = iter(slices)
            call = [a if d is None else next(it) for a, d in zip(args, dims, strict=True)]
            return tuple(primitive.bind(*call, **params))

        return list(jax.lax.map(one, tuple(moved))), [0] * outputs

    return rule


batching.primitive_batchers[attention_p] = _batching(attention_p, 2)
batching.primitive_batchers[attention_bwd_p] = _batching(attention_bwd_p, 5)

# The CPU lowering holds ``custom_partitioning`` calls (the C++ kernel runs per device), which
# need the devices when they are lowered: say so, as jax's own such primitives do.
_jax_dispatch.prim_requires_devices_during_lowering.update({attention_p, attention_bwd_p})


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, rel_row, rel_col, static: Static):
    return attention_p.bind(q, k, v, rel_row, rel_col, static=static)[0]


def _attention_fwd(q, k, v, rel_row, rel_col, static: Static):
    out, lse = attention_p.bind(q, k, v, rel_row, rel_col, static=static)
    return out, (q, k, v, rel_row, rel_col, out, lse)


def _attention_bwd(static: Static, residuals, d_out):
    return tuple(attention_bwd_p.bind(*residuals, d_out, static=static))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, rel_row, rel_col, rows, cols, choices: dict[str, str]) -> Array:
    """``[b, H, W, heads, dim_v]``: the implementations ``choices`` (backend -> name, each
    with a ``Kernel``) on the windows ``rows``/``cols``, for whichever platform it is lowered
    for. ``k`` and the tables may be None."""
    static = Static(
        rows.spec,
        cols.spec,
        k is not None,
        rel_row is not None,
        tuple(sorted(choices.items())),
    )
    placeholder = jnp.zeros((0,), q.dtype)
    k = placeholder if k is None else k
    if rel_row is None:
        rel_row = rel_col = placeholder
    return _attention(q, k, v, rel_row, rel_col, static)
