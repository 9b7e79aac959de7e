"""Reading a ``pallas_call``'s grid without running it: the calls a function traces into, and
for each input the block index at every program, in the order the grid runs them (nested loops,
the first axis outermost). A pipeline copies an input block from HBM again only when its index
changes from one program to the next, so these give the copies a kernel's grid implies
(``benchmarks/tpu_kernel_copies.py`` counts them)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxpr_as_fun


def pallas_calls(fn: Callable, *args) -> list:
    """The grid mappings of the ``pallas_call``s ``fn(*args)`` traces into, in order (its
    top-level equations)."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.params["grid_mapping"] for e in eqns if e.primitive.name == "pallas_call"]


def block_indices(grid_mapping) -> list[np.ndarray]:
    """For each input of the call, ``[programs, block dims]``: its block index at each
    program, in the grid's order."""
    grid = grid_mapping.grid
    ids = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
    ids = jnp.asarray(ids.reshape(-1, len(grid)), jnp.int32)
    out = []
    for bm in grid_mapping.block_mappings[: grid_mapping.num_inputs]:
        fn = jaxpr_as_fun(bm.index_map_jaxpr)
        index = jax.vmap(lambda p, fn=fn: fn(*p))(ids)
        out.append(np.stack([np.asarray(i) for i in index], -1))
    return out


def copies(index: np.ndarray) -> int:
    """How many times a block is copied in: the first program's, then each change of
    ``index`` ``[programs, block dims]`` from one program to the next."""
    return 1 + int(np.any(index[1:] != index[:-1], axis=-1).sum())


__all__ = ["block_indices", "copies", "pallas_calls"]
