"""The sliding-window attention stem (``model.stem_window``, not the paper's; pure JAX, no
kernel), forward and backward in train mode, compiles for TPU (v5e) and H100 in bfloat16 (as
TPU and GPU jobs train; float32 failed the same way) on one device, at the cluttered-digits
config's shapes (3 -> 16 channels, 4 heads, 7x7 at stride 2, batch 64 at 48x48). XLA:GPU
failed on the layer's first form, a dot over the 1-3 input channels of its strided query
pixels: no Triton tile sizes for the layer alone, a GEMM-fusion abort
(``triton_tiling_propagation``) in the whole model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax.models import AttentionStem


def test_sliding_stem_forward_and_backward_compile(platform, devices_of):
    dtype = jnp.bfloat16
    stem = AttentionStem(3, 16, window=7, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(stem, nnx.Param, ...)

    def loss(params, rest, images):  # train mode: the batch norm updates its statistics
        out = nnx.merge(graphdef, params, rest)(images)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    mesh = Mesh(np.array(devices_of(platform, 1)), ("data",))
    whole = NamedSharding(mesh, PartitionSpec())
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole)  # noqa: E731
    images = jax.ShapeDtypeStruct((64, 48, 48, 3), dtype, sharding=whole)
    args = jax.tree.map(spec, (params, rest))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args, images).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
