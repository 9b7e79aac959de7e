"""Lowering the op's kernels per device under ``jax.jit`` over several devices.

A kernel (the C++ custom call, a Pallas call) is opaque to XLA's partitioner: XLA would gather
a batch-sharded input onto every device and run the whole batch there (the CPU and GPU
kernels), or refuse to compile it at all (Mosaic: "cannot be automatically partitioned").
``jax.experimental.custom_partitioning`` is the documented way out, but its callbacks are not
reached on TPU (jax-ml/jax#38196). So when the op's primitive is lowered inside a ``jax.jit``
over several devices, its lowering rule runs the kernel under a ``jax.shard_map`` over the
jit's own devices, whose mesh it takes from the lowering context: every operand and result
that leads with the batch (rank >= 3) is split over all mesh axes, the others (tables) are
replicated, and a result without a batch (a table's gradient) is summed over the devices. A
batch that does not divide over the devices runs whole on every device (XLA's own choice for
an opaque call). Inside ``shard_map`` (the trainer's path) or on one device nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax._src import sharding_impls  # the lowering context's type; no public API
from jax.sharding import Mesh, PartitionSpec

# The axis name of a mesh made for a jit whose inputs name none.
DEVICES_AXIS = "sasa_devices"


def _batched(aval) -> bool:
    """The primitives' operands and results that lead with the batch: q, k, v, outputs and
    their gradients ``[b, H, W, n*c]`` and log-sum-exps ``[b, n, H*W]`` (not the tables
    ``[L, d]`` or the 1-D stand-ins for absent arguments)."""
    return len(aval.shape) >= 3


def _mesh(context: sharding_impls.ShardingContext) -> Mesh:
    """The jit's devices as a mesh: the inputs' mesh axes when the context knows them."""
    devices = np.array(context.device_assignment, dtype=object)
    abstract = context.abstract_mesh
    if abstract is not None and abstract.size == devices.size and abstract.axis_names:
        return Mesh(devices.reshape(abstract.axis_sizes), abstract.axis_names)
    return Mesh(devices, (DEVICES_AXIS,))


def per_device(ctx, fn: Callable) -> Callable:
    """``fn`` (the primitive's pass, returning a list of arrays) to lower in ``ctx``: under a
    ``shard_map`` over the jit's devices when ``ctx`` is a jit over several of them (see the
    module docstring), else ``fn`` itself."""
    context = ctx.module_context.axis_context
    if not isinstance(context, sharding_impls.ShardingContext) or context.num_devices == 1:
        return fn
    if context.device_assignment is None:
        raise NotImplementedError(
            "the attention op needs its devices when it is lowered over several of them"
        )
    mesh = _mesh(context)
    axes = tuple(mesh.axis_names)
    batch = ctx.avals_in[0].shape[0]
    split = batch % mesh.size == 0
    ins = tuple(
        PartitionSpec(axes) if split and _batched(a) else PartitionSpec() for a in ctx.avals_in
    )
    outs = tuple(
        PartitionSpec(axes) if split and _batched(a) else PartitionSpec() for a in ctx.avals_out
    )

    def local(*args):
        results = fn(*args)
        return tuple(
            r if not split or _batched(a) else jax.lax.psum(r, axes)
            for r, a in zip(results, ctx.avals_out, strict=True)
        )

    sharded = jax.shard_map(local, mesh=mesh, in_specs=ins, out_specs=outs, check_vma=False)
    return lambda *args: list(sharded(*args))


__all__ = ["per_device"]
