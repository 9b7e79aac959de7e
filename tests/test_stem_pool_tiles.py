"""The paper's stem on TPU with its batch norm and max pool on the kernel's output tiles
(``nn.attend_norm_pool``'s tile path; ``attention.stem_tpu.tile_moments`` and
``tile_block_max``), run here by its CPU lowering (interpret mode): the moments and the pool
against NumPy, gradients and ties included, and the real stem's tile path against its map
path in train and eval mode. That the stem takes this path on TPU only is
``accelerator_tests``'; the same under ``shard_map`` with device-ordered statistics is in
``test_parallel``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_jax.attention import pallas_tpu, stem_tpu
from sasa_jax.models import AttentionStem
from sasa_jax.nn.stem_attention import _in_tiles, _on_map

BLOCK, HEADS, C = 4, 2, 3


def _map_and_tiles(height, width, seed=0):
    """A map ``[2, H, W, HEADS, C]`` on a coarse grid (so that blocks hold ties) and its
    tiles, with junk in the lanes past the map (the pool and the moments must ignore it)."""
    rng = np.random.default_rng(seed)
    y = np.round(rng.standard_normal((2, height, width, HEADS, C)) * 2) / 2
    lay = stem_tpu.layout(height, width, BLOCK)
    tiles = np.asarray(pallas_tpu.tiles(jnp.asarray(y, jnp.float32), lay))
    inside = np.asarray(lay.tile_index).reshape(lay.tiles, lay.tq) < height * width
    tiles = np.where(inside[None, :, None, None, :], tiles, 7.0)  # larger than every value
    return y.reshape(2, height, width, HEADS * C), jnp.asarray(tiles, jnp.float32), lay


def _block_max_np(y, g):
    """Max over each block of ``y`` ``[b, H, W, C]`` and the gradient of ``sum(max * g)``,
    each block's ``g`` split equally among its maxima."""
    b, h, w, c = y.shape
    blocks = y.reshape(b, h // BLOCK, BLOCK, w // BLOCK, BLOCK, c)
    top = blocks.max(axis=(2, 4))
    hit = blocks == top[:, :, None, :, None]
    share = g / hit.sum(axis=(2, 4))
    return top, (hit * share[:, :, None, :, None]).reshape(y.shape)


@pytest.mark.parametrize("size", [(16, 32), (12, 20), (16, 12), (48, 48)])  # 16x12: padding
def test_tile_block_max_and_its_gradient_match_numpy(size):
    y, tiles, lay = _map_and_tiles(*size)
    g = np.random.default_rng(1).standard_normal((2, size[0] // BLOCK, size[1] // BLOCK, HEADS * C))
    want, want_grad = _block_max_np(y, g)
    got, vjp = jax.vjp(lambda t: stem_tpu.tile_block_max(t, *size, BLOCK), tiles)
    np.testing.assert_array_equal(np.asarray(got), want)
    (d_tiles,) = vjp(jnp.asarray(g, jnp.float32))
    on_map = pallas_tpu.untile(d_tiles, lay, (2, *size, HEADS, C)).reshape(y.shape)
    np.testing.assert_allclose(np.asarray(on_map), want_grad, rtol=1e-6, atol=1e-7)
    # Nothing flows to the lanes past the map (they hold the largest values).
    inside = np.asarray(lay.tile_index).reshape(lay.tiles, lay.tq) < size[0] * size[1]
    assert not np.any(np.moveaxis(np.asarray(d_tiles), (1, 4), (0, 1))[~inside])
    blocks = y.reshape(2, size[0] // BLOCK, BLOCK, size[1] // BLOCK, BLOCK, -1)
    assert ((blocks == want[:, :, None, :, None]).sum(axis=(2, 4)) > 1).any()  # ties are tested


@pytest.mark.parametrize("size", [(16, 32), (12, 20)])
def test_tile_moments_match_numpy(size):
    y, tiles, _ = _map_and_tiles(*size, seed=2)
    got = np.asarray(stem_tpu.tile_moments(tiles, *size, BLOCK))
    want = np.stack([y.mean(axis=(0, 1, 2)), (y * y).mean(axis=(0, 1, 2))])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _stem(values, cin, zero_query=False):
    return AttentionStem(
        cin, HEADS * 8, values=values, num_heads=HEADS, zero_query=zero_query, rngs=nnx.Rngs(0)
    )


def _stem_run(path, values, train, x, zero_query=False):
    """Output, the gradients of a loss (parameters and input) and the running statistics after
    one call of a fresh stem along ``path``."""
    stem = _stem(values, x.shape[-1], zero_query)
    stem.train() if train else stem.eval()
    if not train:  # running statistics away from their initial 0 / 1
        rng = np.random.default_rng(5)
        stem.norm.mean.set_value(jnp.asarray(rng.standard_normal(HEADS * 8) * 0.1, jnp.float32))
        stem.norm.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, HEADS * 8), jnp.float32))
    graphdef, state = nnx.split(stem)
    cotangent = jnp.asarray(
        np.random.default_rng(3).standard_normal(
            (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, HEADS * 8)
        ),
        jnp.float32,
    )

    def loss(module, x):
        out = path(module.attention, module.norm, x)
        return jnp.sum(out * cotangent), out

    @jax.jit
    def run(state, x):
        module = nnx.merge(graphdef, state)
        (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, x)
        return out, grads, nnx.state(module, nnx.BatchStat)

    out, grads, stats = run(state, x)
    return out, grads, stats


@pytest.mark.parametrize("values", ["spatially_aware", "stand_alone"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("image", [(16, 32, 3), (12, 20, 2)])  # the second: tiles overhang
def test_stem_tile_path_matches_map_path(values, train, image):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, *image)), jnp.float32)
    _assert_close(_stem_run(_in_tiles, values, train, x), _stem_run(_on_map, values, train, x))


def test_stem_tile_path_splits_ties_as_the_map_path():
    """With ``zero_query`` every query of a block attends uniformly, so the stem's outputs
    tie in every block: the gradient must be split among them as on the map."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 16, 32, 3)), jnp.float32)
    stem = _stem("spatially_aware", 3, zero_query=True)
    out = np.asarray(stem.attention(x)).reshape(2, 4, BLOCK, 8, BLOCK, HEADS * 8)
    assert np.all(out == out[:, :, :1, :, :1])  # the case is tested: 16-way ties
    tiles = _stem_run(_in_tiles, "spatially_aware", True, x, zero_query=True)
    _assert_close(tiles, _stem_run(_on_map, "spatially_aware", True, x, zero_query=True))


def _assert_close(tiles, on_map):
    for got, want in zip(jax.tree.leaves(tiles), jax.tree.leaves(on_map), strict=True):
        scale = float(np.abs(want).max())  # float32 sums: absolute errors scale with the array's
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6 * scale)
