"""The TPU kernels' grid: the order Pallas runs its programs in decides which blocks it copies
from HBM again. It copies a block only when the block's index changes from one program to the
next, so the selectors of a tile (``[M, TQ]`` int32 each) must stay put while the images of
that tile run: once per tile, not once per program. Checked on the real ``pallas_call``s of
``pallas_tpu.forward`` and ``backward`` (their grid and index maps, evaluated in the grid's
order by ``analysis.pallas_grid``), not on a copy of them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sasa_jax.analysis import pallas_grid
from sasa_jax.attention import pallas_tpu
from sasa_jax.attention.windows import axis_window

IMAGES = 3
ROWS, COLS = axis_window(20, 7, 1, "mask"), axis_window(40, 7, 1, "mask")


def _copies(grid_mapping) -> tuple[list[int], list[set], int]:
    """For each input: how many times its block is copied in over the grid (the first
    program's copy included); the blocks it visits; and the number of programs."""
    indices = pallas_grid.block_indices(grid_mapping)
    seen = [set(map(tuple, index.tolist())) for index in indices]
    return [pallas_grid.copies(index) for index in indices], seen, len(indices[0])


def test_each_tiles_selectors_are_copied_once_for_all_images():
    x = jnp.zeros((IMAGES, 20, 40, 2, 8), jnp.float32)
    table = jnp.zeros((7, 4), jnp.float32)
    lay = pallas_tpu.layout(ROWS.spec, COLS.spec)
    tiles = lay.rows.tiles * lay.cols.tiles
    assert lay.rows.tiles > 1 and lay.cols.tiles > 1  # both selectors change between tiles

    def forward(q, k, v):
        return pallas_tpu.forward(q, k, v, table, table, ROWS, COLS, interpret=True)

    def backward(q, k, v):
        out, lse = forward(q, k, v)
        return pallas_tpu.backward(q, k, v, table, table, out, lse, out, ROWS, COLS, interpret=True)

    backward_calls = pallas_grid.pallas_calls(backward, x, x, x)[1:]  # after its forward
    calls = pallas_grid.pallas_calls(forward, x, x, x) + backward_calls
    assert len(calls) == 2
    for grid_mapping in calls:
        copies, seen, programs = _copies(grid_mapping)
        assert programs == IMAGES * tiles
        inputs = grid_mapping.block_mappings[: grid_mapping.num_inputs]
        dtypes = [bm.array_aval.dtype for bm in inputs]
        selectors = [i for i, dtype in enumerate(dtypes) if dtype == np.int32]
        assert len(selectors) == 2
        for i in selectors:
            assert copies[i] <= tiles, (i, copies[i])
        # every (image, tile) block of q is visited, each once
        assert copies[0] == programs and len(seen[0]) == programs


def test_one_tile_puts_the_images_first():
    """With one tile there is nothing to keep in VMEM: the images are the leading (parallel)
    axis, so that it is not one long."""
    win = axis_window(7, 7, 1, "mask")
    x = jnp.zeros((IMAGES, 7, 7, 2, 8), jnp.float32)

    def forward(q, k, v):
        return pallas_tpu.forward(q, k, v, None, None, win, win, interpret=True)

    (grid_mapping,) = pallas_grid.pallas_calls(forward, x, x, x)
    assert tuple(grid_mapping.grid) == (IMAGES, 1)
    copies, seen, programs = _copies(grid_mapping)
    assert programs == IMAGES and copies[0] == IMAGES and len(seen[0]) == IMAGES
