"""Running an opaque per-image computation (a custom call) on sharded batches and under vmap.

A custom call is opaque to XLA's SPMD partitioner, which would gather a batch-sharded input
onto every device and run the whole batch there. ``per_image`` wraps such a call so that under
``jax.jit`` with a sharded batch every device runs it on its own images (results that are sums
over the batch are then summed over the batch's mesh axes), and so that ``jax.vmap`` maps it
over the vmapped axis one slice at a time.
"""

from __future__ import annotations

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


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


def per_image(call, geometry, arg_ranks, batched_args, result_ranks, batched_results):
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


__all__ = ["per_image"]
