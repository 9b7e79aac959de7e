"""Bytes the TPU kernels' pipeline copies from HBM into VMEM at ResNet-26's attention shapes
(224x224, batch 32 by default): each input block is copied again only when its index changes
from one program to the next, so the copies follow from the grid's order and the index maps.
This reads them off the real ``pallas_call``s of ``pallas_tpu.forward`` and ``backward`` (their
grids and index maps evaluated over every program, in order), on any host; no TPU runs.

    python benchmarks/tpu_kernel_copies.py --batch=32 --json

Rows: the stage layers (window 7, 8 heads, bfloat16) at each map size and width of the model,
and the attention stem's geometry (4x4 blocks of a 224x224 map, 4 heads of 16). For each, the
forward and backward kernels' input copies in all, and the part that is the selector tables
(int32). XLA's own count (``cost_analysis``) takes each array once, whatever the grid copies.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.analysis import pallas_grid
from sasa_jax.attention import pallas_tpu
from sasa_jax.attention.windows import BLOCKS, axis_window

# ResNet-26 at 224x224: (map side, width, attention layers at that shape), and the stem's.
STAGES = [(56, 64, 1), (56, 128, 1), (28, 128, 1), (28, 256, 1), (14, 256, 3), (14, 512, 1)]
STEM = (224, 4, 16)  # map side, heads, channels a head


def copied_bytes(grid_mapping) -> tuple[int, int]:
    """(all inputs, the int32 ones): bytes of the blocks copied in over the grid
    (``analysis.pallas_grid``: a block is copied when its index changes)."""
    total = selectors = 0
    inputs = grid_mapping.block_mappings[: grid_mapping.num_inputs]
    for bm, index in zip(inputs, pallas_grid.block_indices(grid_mapping), strict=True):
        block = int(np.prod([d.block_size for d in bm.block_shape]))
        size = pallas_grid.copies(index) * block * bm.array_aval.dtype.itemsize
        total += size
        selectors += size if bm.array_aval.dtype == np.int32 else 0
    return total, selectors


def _calls(rows, cols, batch: int, heads: int, channels: int) -> list:
    x = jax.ShapeDtypeStruct((batch, rows.size, cols.size, heads, channels), jnp.bfloat16)
    table = jnp.zeros((7, channels // 2), jnp.bfloat16)  # k=7 windows, or 2 * 4 - 1 in blocks

    def step(q, k, v):
        out, lse = pallas_tpu.forward(q, k, v, table, table, rows, cols)
        return pallas_tpu.backward(q, k, v, table, table, out, lse, out, rows, cols)

    return pallas_grid.pallas_calls(step, x, x, x)


def measure(batch: int) -> list[dict]:
    shapes = [(f"{s}x{s}x{w}", axis_window(s, 7, 1, "mask"), 8, w // 8, n) for s, w, n in STAGES]
    size, heads, channels = STEM
    stem = axis_window(size, 4, 1, BLOCKS)
    shapes.append((f"stem {size}x{size}", stem, heads, channels, 1))
    rows = []
    for name, win, heads, channels, layers in shapes:
        for kernel, grid_mapping in zip(
            ("forward", "backward"), _calls(win, win, batch, heads, channels), strict=True
        ):
            total, selectors = copied_bytes(grid_mapping)
            rows.append(
                {
                    "shape": name,
                    "layers": layers,
                    "kernel": kernel,
                    "programs": int(np.prod(grid_mapping.grid)),
                    "copied_bytes": total,
                    "selector_bytes": selectors,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rows = measure(args.batch)
    for row in rows:
        print(
            f"{row['shape']} {row['kernel']} (x{row['layers']}): {row['programs']} programs, "
            f"{row['copied_bytes'] / 1e6:.0f} MB copied in, of which selectors "
            f"{row['selector_bytes'] / 1e6:.1f} MB",
            flush=True,
        )
    stages = [r for r in rows if not r["shape"].startswith("stem")]
    for label, part in (
        ("stage layers, a train step", stages),
        ("the stem, a train step", [r for r in rows if r not in stages]),
    ):
        total = sum(r["copied_bytes"] * r["layers"] for r in part)
        sel = sum(r["selector_bytes"] * r["layers"] for r in part)
        print(f"{label}: {total / 1e9:.2f} GB copied in, selectors {sel / 1e9:.3f} GB")
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
