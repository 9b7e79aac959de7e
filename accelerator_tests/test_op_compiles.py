"""The op's Pallas kernel, forward and backward, compiles for TPU (v5e) and H100: in bfloat16
on one device, in float32 under a plain ``jax.jit`` over four with a batch-sharded input. At
the four ResNet-50 stage shapes (k=7, 8 heads, relative tables) and the attention stem's (4x4
blocks of a 224x224 map, 4 heads of 16), in one program per case. (``auto`` takes the kernel on
every TPU shape, and on a GPU only where the map fits in one window.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sasa_jax

STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (map side, channels): ResNet-50 at 224
STEM = (224, 4, 16)  # map side, heads, head dim
PER_DEVICE = 2


def _operands(dtype, batch, sharding, replicated):
    def array(shape, split=True):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding if split else replicated)

    stages = []
    for size, width in STAGES:
        head = width // 8
        x = array((batch, size, size, 8, head))
        stages.append((x, x, x, array((7, head // 2), False), array((7, head // 2), False)))
    size, heads, head = STEM
    x = array((batch, size, size, heads, head))
    stem = (x, x, x, array((7, head // 2), False), array((7, head // 2), False))
    return stages, stem


def _loss(stages, stem):
    total = 0.0
    for q, k, v, rr, rc in stages:
        out = sasa_jax.local_attention(
            q, k, v, window=7, rel_row=rr, rel_col=rc, implementation="pallas"
        )
        total += jnp.sum(out.astype(jnp.float32) ** 2)
    q, k, v, rr, rc = stem
    out = sasa_jax.block_attention(
        q, k, v, block=4, rel_row=rr, rel_col=rc, implementation="pallas"
    )
    return total + jnp.sum(out.astype(jnp.float32) ** 2)


# Each dtype's kernels at every geometry, and the sharded program once: bfloat16 (the kernels'
# narrow path) on one device, float32 on four. The two other pairs compile the same per-device
# kernels again, and CI has 15 minutes (float32 on four H100s alone took 76-109 s in CI).
@pytest.mark.parametrize(("dtype", "count"), [("bfloat16", 1), ("float32", 4)])
def test_op_forward_and_backward_compile(platform, dtype, count, devices_of):
    mesh = Mesh(np.array(devices_of(platform, count)), ("data",))
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    stages, stem = _operands(jnp.dtype(dtype), PER_DEVICE * count, split, whole)
    compiled = jax.jit(jax.grad(_loss, argnums=(0, 1))).lower(stages, stem).compile()
    text = compiled.as_text()
    # Each of the five geometries has its forward and backward kernel.
    assert len(re.findall(re.escape(KERNEL[platform]), text)) >= 10
    if count > 1:  # each device attends over its own images: nothing gathers the batch
        assert "all-gather" not in text and "all-to-all" not in text
    assert compiled.memory_analysis().temp_size_in_bytes >= 0


def test_auto_compiles_pure_jax_for_a_gpu_before_ampere():
    """Pallas's Triton path needs compute capability 8.0: for a T4 (7.5, Colab's free GPU)
    ``auto`` compiles the op with a pure-JAX implementation, and an H100 gets the kernel (on a
    7x7 map in a 7x7 window: on larger maps ``auto`` takes "tiled" on every GPU)."""
    from sasa_jax.analysis import targets

    x = jax.ShapeDtypeStruct((2, 7, 7, 8, 16), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((7, 8), jnp.bfloat16)

    def loss(q, k, v, rr, rc):
        out = sasa_jax.local_attention(q, k, v, window=7, rel_row=rr, rel_col=rc)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    for name, kernels in (("t4:1", 0), ("h100:1", 2)):
        (device,) = targets.devices(targets.parse_topology(name))
        mesh = Mesh(np.array([device]), ("data",))
        put = NamedSharding(mesh, PartitionSpec())
        args = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=put) for a in (x, x, x, table, table)
        ]
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
        assert text.count(KERNEL["cuda"]) == kernels, name
