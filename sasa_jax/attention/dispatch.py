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

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch as _jax_dispatch  # no public API for the set below
from jax.extend import core
from jax.interpreters import batching, mlir

from sasa_jax.attention.per_device import per_device
from sasa_jax.attention.registry import Kernel, auto_choice, registered
from sasa_jax.attention.windows import axis_window

Array = jax.Array

# The lowering platforms and the JAX backend whose choice each one takes.
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Static:
    """The static parameters of one call: window specs, what is present, the implementation
    asked for, whether the windows are ``block_attention``'s, and the implementation chosen for
    each backend (``(backend, name)`` pairs)."""

    rows: tuple[int, int, int, str]
    cols: tuple[int, int, int, str]
    has_key: bool
    has_rel: bool
    requested: str
    blocks: bool
    choices: tuple[tuple[str, str], ...]
    heads: int

    def kernel(self, platform: str, ctx) -> Kernel:
        """The kernel of the implementation chosen for ``platform``. Where the device the call
        is compiled for cannot run it (the Triton kernels before Ampere), "auto" takes its next
        rule and a name asked for raises ValueError."""
        backend = PLATFORMS[platform]
        name = dict(self.choices)[backend]
        device = _device(ctx)
        if device is None or registered(name).supports(device):
            return registered(name).kernel
        kind = getattr(device, "device_kind", "this device")
        if self.requested != "auto":
            raise ValueError(
                f"implementation {name!r} does not run on {kind}; use implementation='auto'"
            )
        shape = tuple(ctx.avals_in[0].shape)
        rows, cols = axis_window(*self.rows), axis_window(*self.cols)
        name = auto_choice(shape, rows, cols, backend, device)
        if name == "gather" or (self.blocks and name == "dense"):
            name = "tiled"  # a kernel that also runs blocks on the whole map
        return registered(name).kernel

    def unpack(self, k, rel_row, rel_col):
        """The placeholders of absent arguments back to None."""
        k = k if self.has_key else None
        return (k, rel_row, rel_col) if self.has_rel else (k, None, None)

    def heads_apart(self, x):
        """``[b, H, W, n*c] -> [b, H, W, n, c]`` (placeholders as they are)."""
        if x.ndim != 4:
            return x
        return x.reshape(*x.shape[:3], self.heads, x.shape[3] // self.heads)


# The primitives take and give q, k, v, outputs and their gradients as [b, H, W, n*c] and the
# log-sum-exp as [b, n, H*W]: on TPU an array's last two dimensions are tiled (8, 128), so the
# op's own [b, H, W, n, c] would be padded up to 32x wherever XLA keeps it (the residuals saved
# for the backward pass). The lowering rules give the kernels the op's layout.


def _heads_together(x):
    """``[b, H, W, n, c] -> [b, H, W, n*c]``."""
    return x.reshape(*x.shape[:3], -1)


def _lse_out(lse):
    """A kernel's ``[b, H, W, n]`` log-sum-exp as the primitive's ``[b, n, H*W]``."""
    b, h, w, n = lse.shape
    return lse.reshape(b, h * w, n).transpose(0, 2, 1)


def _lse_in(lse, shape):
    """The primitive's ``[b, n, H*W]`` log-sum-exp as a kernel's ``[b, H, W, n]``."""
    b, h, w = shape[:3]
    return lse.transpose(0, 2, 1).reshape(b, h, w, -1)


def _device(ctx):
    """A device the lowering compiles for, when the context knows its devices."""
    context = ctx.module_context.axis_context
    assignment = getattr(context, "device_assignment", None)
    if assignment:
        return assignment[0]
    mesh = getattr(context, "mesh", None)
    devices = getattr(mesh, "devices", None)
    return None if devices is None else np.asarray(devices).flat[0]


# The GPU a Triton kernel is lowered for when no GPU is attached and the context names none:
# compute capability 9.0, as JAX before 0.11 assumed.
DEFAULT_GPU = "NVIDIA H100"


def _gpu_target(platform: str, ctx) -> contextlib.AbstractContextManager:
    """For a CUDA or ROCm lowering on a host without a GPU (``jax.export``, or compile-only
    devices): the abstract mesh's device set to the target -- the device compiled for, else
    ``DEFAULT_GPU`` -- since Pallas's Triton lowering reads the compute capability from it
    from JAX 0.11 on (before, it assumed 9.0). Nothing where a GPU is attached or the context
    already names a device."""
    current = jax.sharding.get_abstract_mesh()
    named = current.abstract_device is not None
    if platform not in ("cuda", "rocm") or named or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    target = _device(ctx)  # jax.export's is the host's CPU
    on_gpu = getattr(target, "platform", None) in ("gpu", "cuda", "rocm")
    kind = target.device_kind if on_gpu else DEFAULT_GPU
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(current.update(abstract_device=device))


attention_p = core.Primitive("sasa_attention")
attention_p.multiple_results = True
attention_bwd_p = core.Primitive("sasa_attention_bwd")
attention_bwd_p.multiple_results = True


def _forward_abstract(q, k, v, rel_row, rel_col, *, static: Static):
    b, h, w = q.shape[:3]
    return (
        jax.core.ShapedArray(v.shape, v.dtype),
        jax.core.ShapedArray((b, static.heads, h * w), jnp.float32),
    )


def _backward_abstract(q, k, v, rel_row, rel_col, out, lse, d_out, *, static: Static):
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v, rel_row, rel_col))


def _forward_rule(platform: str):
    def forward(q, k, v, rel_row, rel_col, *, static: Static, kernel: Kernel):
        rows, cols = axis_window(*static.rows), axis_window(*static.cols)
        q, k, v = (static.heads_apart(x) for x in (q, k, v))
        k, rel_row, rel_col = static.unpack(k, rel_row, rel_col)
        out, lse = kernel.forward(q, k, v, rel_row, rel_col, rows, cols, platform)
        return [_heads_together(out), _lse_out(lse)]

    def rule(ctx, *args, static: Static):
        kernel = static.kernel(platform, ctx)
        fn = per_device(ctx, functools.partial(forward, static=static, kernel=kernel))
        with _gpu_target(platform, ctx):
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    return rule


def _backward_rule(platform: str):
    def backward(q, k, v, rel_row, rel_col, out, lse, d_out, *, static: Static, kernel: Kernel):
        rows, cols = axis_window(*static.rows), axis_window(*static.cols)
        placeholders = (q, k, v, rel_row, rel_col)
        q, k, v, out, d_out = (static.heads_apart(x) for x in (q, k, v, out, d_out))
        lse = _lse_in(lse, q.shape)
        key, row, col = static.unpack(k, rel_row, rel_col)
        grads = kernel.backward(q, key, v, row, col, out, lse, d_out, rows, cols, platform)
        return [
            jnp.zeros_like(p) if g is None else g.reshape(p.shape).astype(p.dtype)
            for g, p in zip(grads, placeholders, strict=True)
        ]

    def rule(ctx, *args, static: Static):
        kernel = static.kernel(platform, ctx)
        fn = per_device(ctx, functools.partial(backward, static=static, kernel=kernel))
        with _gpu_target(platform, ctx):
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    return rule


def _eager(primitive):
    def impl(*args, **params):
        return jax.jit(lambda *a: primitive.bind(*a, **params))(*args)

    return impl


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


def define(primitive: core.Primitive, abstract, rules: dict, outputs: int) -> None:
    """A kernel primitive's abstract evaluation, its eager rule (its own bind under
    ``jax.jit``), a lowering rule per platform (``rules``: platform -> rule), its vmap rule
    (one call per slice; ``outputs`` results), and that it needs its devices when lowered
    (``per_device``)."""
    primitive.def_abstract_eval(abstract)
    primitive.def_impl(_eager(primitive))
    for platform, rule in rules.items():
        mlir.register_lowering(primitive, rule, platform=platform)
    batching.primitive_batchers[primitive] = _batching(primitive, outputs)
    _jax_dispatch.prim_requires_devices_during_lowering.add(primitive)


define(attention_p, _forward_abstract, {p: _forward_rule(p) for p in PLATFORMS}, outputs=2)
define(attention_bwd_p, _backward_abstract, {p: _backward_rule(p) for p in PLATFORMS}, outputs=5)


def differentiable(forward: core.Primitive, backward: core.Primitive, saved: slice) -> Callable:
    """``call(arrays, static)``: the first output of ``forward`` bound on ``arrays``, as a
    ``custom_vjp`` whose backward pass binds ``backward`` on the arrays, the forward's outputs
    ``saved`` and the first output's cotangent, and returns a gradient for each array
    (``static``, the primitives' parameter, is not differentiated)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def call(arrays: tuple, static):
        return forward.bind(*arrays, static=static)[0]

    def call_fwd(arrays: tuple, static):
        outputs = forward.bind(*arrays, static=static)
        return outputs[0], (arrays, tuple(outputs[saved]))

    def call_bwd(static, residuals, d_out):
        arrays, outputs = residuals
        return (tuple(backward.bind(*arrays, *outputs, d_out, static=static)),)

    call.defvjp(call_fwd, call_bwd)
    return call


# The output and its log-sum-exp are both kept for the backward pass.
_attention = differentiable(attention_p, attention_bwd_p, slice(None))


def attention(
    q,
    k,
    v,
    rel_row,
    rel_col,
    rows,
    cols,
    choices: dict[str, str],
    *,
    requested: str = "auto",
    blocks: bool = False,
) -> Array:
    """``[b, H, W, heads, dim_v]``: the implementations ``choices`` (backend -> name, each
    with a ``Kernel``) on the windows ``rows``/``cols``, for whichever platform it is lowered
    for. ``k`` and the tables may be None; ``requested`` is the implementation asked for and
    ``blocks`` says the windows are ``block_attention``'s."""
    static = Static(
        rows.spec,
        cols.spec,
        k is not None,
        rel_row is not None,
        requested,
        blocks,
        tuple(sorted(choices.items())),
        q.shape[3],
    )
    placeholder = jnp.zeros((0,), q.dtype)
    k = placeholder if k is None else _heads_together(k)
    if rel_row is None:
        rel_row = rel_col = placeholder
    out = _attention((_heads_together(q), k, _heads_together(v), rel_row, rel_col), static)
    return static.heads_apart(out)
