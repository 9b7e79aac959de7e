"""Cross-device means whose rounding does not depend on how the devices sit in processes.

``lax.psum`` leaves the order of its additions to the collective library: XLA's in-process
all-reduce and gloo between processes round differently, so one process with 4 devices and two
processes with 2 devices each drift apart by an ulp per sum, which training amplifies (ReLU
and max-pool gradients switch on 1-ulp differences). The means here add the per-device values
in device order, so every split of the same devices over processes gives the same bits.

They run inside ``jax.shard_map`` over a named mesh axis:

- ``ordered_mean(tree, axis)``: all-to-all (each device receives every device's copy of one
  slice of the flattened tree), an in-order sum of those copies, then an all-gather of the
  summed slices. Each device sends and receives what a ring all-reduce would.
- ``ordered_mean_grad(x, axis)``: all-gather then an in-order mean, for small statistics that
  are differentiated (batch norm); its backward pass is the same ordered mean of the
  cotangents, as ``psum``'s is ``psum``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

LANES = 128  # a TPU vector register's lanes


def _sum_in_order(rows: jax.Array) -> jax.Array:
    """``[n, ...] -> [...]``: ``((rows[0] + rows[1]) + rows[2]) + ...``, spelled out."""
    total = rows[0]
    for i in range(1, rows.shape[0]):
        total = total + rows[i]
    return total


def ordered_mean(tree: Any, axis_name: str) -> Any:
    """The mean over ``axis_name`` of every leaf of ``tree``, added in device order.

    Leaves may have any shapes and float dtypes; the sums run in their common dtype and each
    result is cast back to its leaf's dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    n = lax.axis_size(axis_name)
    dtype = jnp.result_type(*leaves)
    # Every leaf as rows of LANES values, stacked: on TPU a flat vector (or a [n, chunk]
    # split of it) gets laid out with a short dimension last and padded to 128 lanes.
    rows = [_as_rows(leaf.astype(dtype)) for leaf in leaves]
    stacked = jnp.concatenate(rows, axis=0)
    per_device = -(-stacked.shape[0] // n)
    stacked = jnp.pad(stacked, [(0, n * per_device - stacked.shape[0]), (0, 0)])
    split = stacked.reshape(n, per_device, LANES)
    received = lax.all_to_all(split, axis_name, split_axis=0, concat_axis=0)  # [n, rows, 128]
    mine = _sum_in_order(received) / n
    whole = lax.all_gather(mine, axis_name).reshape(n * per_device, LANES)
    out, start = [], 0
    for leaf, block in zip(leaves, rows, strict=True):
        values = whole[start : start + block.shape[0]].reshape(-1)[: leaf.size]
        out.append(values.reshape(leaf.shape).astype(leaf.dtype))
        start += block.shape[0]
    return jax.tree.unflatten(treedef, out)


def _as_rows(x: jax.Array) -> jax.Array:
    """``x`` raveled and zero-padded into ``[rows, LANES]``."""
    flat = jnp.ravel(x)
    return jnp.pad(flat, (0, -flat.size % LANES)).reshape(-1, LANES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ordered_mean_grad(x: jax.Array, axis_name: str) -> jax.Array:
    """The mean of ``x`` over ``axis_name``, in device order; differentiable."""
    return _sum_in_order(lax.all_gather(x, axis_name)) / lax.axis_size(axis_name)


def _ordered_mean_fwd(x, axis_name):
    return ordered_mean_grad(x, axis_name), None


def _ordered_mean_bwd(axis_name, _, g):
    return (ordered_mean_grad(g, axis_name),)


ordered_mean_grad.defvjp(_ordered_mean_fwd, _ordered_mean_bwd)
