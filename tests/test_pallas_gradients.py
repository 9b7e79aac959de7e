"""The Pallas kernels' backward passes in half precision: gradients close to the float32
reference, and written in the inputs' dtype wherever nothing adds them up afterwards (every
query's gradient; keys' and values' when halos do not overlap, as in the stem's blocks).
Both layouts run in interpret mode: "pallas" (the GPU layout on CPU) and the TPU layout
(conftest.py registers it as "pallas_tpu_interpret")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_attention_np, reference_block_attention_np

import sasa_jax
from sasa_jax.attention import pallas_gpu, pallas_tpu
from sasa_jax.attention.windows import BLOCKS, axis_window

LAYOUTS = ("pallas", "pallas_tpu_interpret")
SHAPE = (2, 8, 16, 2, 8)  # batch, height, width, heads, dim: two GPU tiles, one TPU tile
WIDE = (1, 16, 32, 2, 8)  # 8 GPU tiles, 4 TPU tiles: 3x3 windows' halos overlap in both


def _inputs(rows: int, shape: tuple[int, ...] = SHAPE):
    """q, k, v, the relative tables (``rows`` each) and an output cotangent."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    tables = {n: rng.standard_normal((rows, SHAPE[-1] // 2)).astype(np.float32) for n in "rc"}
    c_out = rng.standard_normal(shape).astype(np.float32)
    return q, k, v, tables["r"], tables["c"], c_out


def _grads(attend, arrays, dtype):
    """Gradients of ``sum(attend(q, k, v, rel_row, rel_col) * c_out)`` in ``dtype``."""
    *inputs, c_out = (jnp.asarray(a, dtype) for a in arrays)

    def loss(*inputs):
        return jnp.sum(attend(*inputs).astype(jnp.float32) * c_out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*inputs)


def _rounded(arrays):
    return [np.float32(jnp.asarray(a, jnp.bfloat16)) for a in arrays]


def _kernel_outputs(module, window: int, border: str) -> list:
    """The dtypes of the first three outputs (dq, dk, dv) of the backward ``pallas_call`` of
    a layout module (``pallas_gpu`` or ``pallas_tpu``) on bf16 inputs of shape ``WIDE``."""
    rows, cols = (axis_window(size, window, 1, border) for size in WIDE[1:3])
    table_rows = 2 * window - 1 if border == BLOCKS else window
    arrays = _inputs(table_rows, WIDE)
    q, k, v, rel_row, rel_col, d_out = (jnp.asarray(a, jnp.bfloat16) for a in arrays)
    lse = jnp.zeros(WIDE[:4], jnp.float32)

    def backward(q, k, v, rel_row, rel_col, out, lse, d_out):
        return module.backward(
            q, k, v, rel_row, rel_col, out, lse, d_out, rows, cols, interpret=True
        )

    jaxpr = jax.make_jaxpr(backward)(q, k, v, rel_row, rel_col, v, lse, d_out).jaxpr
    calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1, [e.primitive.name for e in jaxpr.eqns]
    return [var.aval.dtype for var in calls[0].outvars[:3]]


def _attention(geometry: str, implementation: str):
    """The stem's 4x4 blocks ("blocks") or overlapping 3x3 windows ("windows")."""

    def attend(q, k, v, rel_row, rel_col):
        tables = dict(rel_row=rel_row, rel_col=rel_col, implementation=implementation)
        if geometry == "blocks":
            return sasa_jax.block_attention(q, k, v, block=4, **tables)
        return sasa_jax.local_attention(q, k, v, window=3, **tables)

    return attend


def _reference_grads(geometry: str, q, k, v, rel_row, rel_col, c_out) -> tuple:
    """dq, dk, dv of ``sum(out * c_out)`` from the float64 NumPy reference."""
    if geometry == "blocks":
        zeros = np.zeros((SHAPE[0] * (SHAPE[1] // 4) * (SHAPE[2] // 4), 4, 4, SHAPE[3], 16))
        grads = reference_block_attention_np(q, k, v, rel_row, rel_col, 4, c_out=c_out, c_w=zeros)
    else:
        zeros = np.zeros(SHAPE[:4] + (9,))
        tables = dict(window=3, dilation=1, border="mask", c_out=c_out, c_w=zeros)
        grads = reference_attention_np(q, k, v, rel_row, rel_col, **tables)
    return grads[2][:3]


@pytest.mark.parametrize("geometry, table_rows", [("blocks", 7), ("windows", 3)])
@pytest.mark.parametrize("implementation", LAYOUTS)
def test_bfloat16_gradients_stay_close_to_the_reference(implementation, geometry, table_rows):
    """bf16 inputs: q, k and v gradients in bf16, within bf16's rounding of the float32
    reference on the same rounded inputs; for the blocks written in bf16 by the kernel, for
    the windows added up in float32 on the map and then rounded."""
    arrays = _inputs(table_rows)
    grads = _grads(_attention(geometry, implementation), arrays, jnp.bfloat16)
    want = _reference_grads(geometry, *_rounded(arrays))
    for got, ref in zip(grads, want, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.float32(got) / scale, ref / scale, atol=2e-2)


@pytest.mark.parametrize("module", [pallas_gpu, pallas_tpu], ids=["gpu", "tpu"])
def test_backward_writes_half_precision_where_nothing_adds_up(module):
    """The backward kernel's q-, k- and v-shaped outputs: bf16 for the stem's 4x4 blocks (each
    key in one halo); for overlapping 3x3 windows the keys' and values' stay float32, since
    the halos' gradients are added up on the map afterwards."""
    assert _kernel_outputs(module, 4, BLOCKS) == [jnp.bfloat16] * 3
    assert _kernel_outputs(module, 3, "mask") == [jnp.bfloat16, jnp.float32, jnp.float32]
