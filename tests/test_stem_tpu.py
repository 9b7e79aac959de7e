"""The attention stem's TPU path (``attention.stem_tpu``: projections in the kernel's tile
layout), run here by its CPU lowering (the same Mosaic-layout kernels in Pallas's interpret
mode): outputs and gradients against an independent float64 reference (the projections in
NumPy, then the per-tile reference attention), and the real layer's two paths against each
other. That ``StemAttention`` takes this path on TPU only is ``accelerator_tests``'."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import (
    assert_stem_vmap_is_per_slice,
    reference_stem_attention_np,
    stem_arrays,
)
from flax import nnx

from sasa_jax.attention import stem_attention
from sasa_jax.nn import StemAttention

HEADS, BLOCK = 2, 4


def _arrays(image, cin, width, seed=0):
    return stem_arrays(image, cin, width, HEADS, BLOCK, seed=seed)


def _reference(x, wq, wk, wv, rel_row, rel_col, c_out):
    return reference_stem_attention_np(x, wq, wk, wv, rel_row, rel_col, c_out, HEADS, BLOCK)


def _ours(arrays, dtype):
    *inputs, c_out = arrays

    def loss(x, *weights):
        out = stem_attention(x.astype(dtype), *weights, heads=HEADS, block=BLOCK)
        return jnp.sum(out.astype(jnp.float32) * c_out), out

    step = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)
    (_, out), grads = jax.jit(step)(*(jnp.asarray(a) for a in inputs))
    return out, grads


# (image, input channels, width): RGB on whole tiles (8x16), grey on a map the tiles overhang.
CASES = [((16, 32), 3, 16), ((12, 20), 1, 8)]


@pytest.mark.parametrize("image, cin, width", CASES, ids=["rgb-16x32", "grey-12x20"])
def test_stem_attention_matches_the_reference(image, cin, width):
    arrays = _arrays(image, cin, width)
    ref_out, ref_grads = _reference(*arrays)
    out, grads = _ours(arrays, jnp.float32)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stem_attention_in_bfloat16_stays_close():
    """bf16 input (float32 weights): a bf16 output and float32 weight gradients within bf16's
    rounding of the reference on the rounded input."""
    arrays = list(_arrays((16, 32), 3, 16))
    arrays[0] = np.float32(jnp.asarray(arrays[0], jnp.bfloat16))
    ref_out, ref_grads = _reference(*arrays)
    out, grads = _ours(arrays, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    chex.assert_type(grads[1:], jnp.float32)
    for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.float32(got) / scale, want / scale, atol=3e-2)


@pytest.mark.parametrize("values", ["spatially_aware", "stand_alone"])
def test_the_layers_two_paths_agree(values):
    """``StemAttention``'s TPU path (its value matrices arranged per position for the tiles)
    and its map path (``block_attention``): the same output and parameter gradients."""
    layer = StemAttention(3, 16, num_heads=HEADS, values=values, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, 16, 32, 3))
    c_out = jax.random.normal(jax.random.key(2), (2, 16, 32, 16))

    def loss(params, path):
        layer = nnx.merge(graphdef, params)
        out = layer.attend_in_tiles(x) if path == "tiles" else layer._attend(x, False)[0]
        return jnp.sum(out * c_out)

    tiles, on_map = (
        jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, path)
        for path in ("tiles", "map")
    )
    np.testing.assert_allclose(tiles[0], on_map[0], rtol=1e-5)
    chex.assert_trees_all_close(tiles[1], on_map[1], rtol=1e-4, atol=1e-5)


def test_vmap_runs_one_call_per_slice():
    """Under ``jax.vmap`` (over a leading axis of the input) the output and the weights'
    gradients are those of the calls one slice at a time."""
    arrays = _arrays((8, 16), 3, 16)
    assert_stem_vmap_is_per_slice(stem_attention, arrays, heads=HEADS, block=BLOCK)


def test_bad_arguments_are_refused():
    x, wq, wk, wv, rel_row, rel_col, _ = _arrays((16, 32), 3, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        stem_attention(x[:, :14], wq, wk, wv, rel_row, rel_col, heads=HEADS, block=BLOCK)
    with pytest.raises(ValueError, match="wv must be"):
        stem_attention(x, wq, wk, wv[:-1], rel_row, rel_col, heads=HEADS, block=BLOCK)
