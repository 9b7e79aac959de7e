"""The paper's attention stem (``models.AttentionStem``: 4x4 blocks, BN, ReLU, 4x4 max pool),
forward and backward in train mode in bfloat16, compiles for TPU (v5e) and H100: on one
device, and under a plain ``jax.jit`` over four with a batch-sharded input. On TPU it runs the
kernels with the projections in their tile layout (``attention.stem_tpu``, lowered per device:
nothing gathers the batch) and takes the batch norm and the pool on their output tiles, so no
full-resolution map is made; on a GPU the Triton kernel on the map's q, k and v."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax.attention.stem_tpu import KERNEL_NAME
from sasa_jax.models import AttentionStem


@pytest.mark.parametrize("count", [1, 4])
def test_attention_stem_forward_and_backward_compile(platform, count, devices_of):
    dtype = jnp.bfloat16
    stem = AttentionStem(3, 16, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(stem, nnx.Param, ...)

    def loss(params, rest, images):  # train mode: the batch norm updates its statistics
        out = nnx.merge(graphdef, params, rest)(images)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    mesh = Mesh(np.array(devices_of(platform, count)), ("data",))
    whole = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole)  # noqa: E731
    images = jax.ShapeDtypeStruct((2 * count, 32, 32, 3), dtype, sharding=split)
    args = jax.tree.map(spec, (params, rest))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args, images).compile()
    text = compiled.as_text()
    on_tpu = platform == "tpu"
    assert (f"{KERNEL_NAME}_forward_kernel" in text) == on_tpu
    assert (f"{KERNEL_NAME}_backward_kernel" in text) == on_tpu
    assert "all-gather" not in text and "all-to-all" not in text
    # On TPU the batch norm and the pool read the kernel's output tiles: no array of the
    # full-resolution map (2 images of 32x32x16 a device) is made, in either dtype.
    full = [f"{t}[2,32,32,16]" for t in ("bf16", "f32")]
    assert any(name in text for name in full) != on_tpu
