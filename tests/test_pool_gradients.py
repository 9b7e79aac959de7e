"""The stem's max pool on the map (``nn.block_max``, CPU and GPU): its gradient against NumPy
with ties (each block's split among its maxima, as ``jnp.max``'s), and the whole stem's
gradient compiled with ``--xla_backend_optimization_level=0`` alone, where comparing values
that XLA computed twice missed maxima (``attention.maxima``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.nn import block_max


def test_block_max_gradient_splits_ties_as_numpy():
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((2, 8, 12, 3)) * 2) / 2  # a coarse grid: ties
    g = rng.standard_normal((2, 2, 3, 3))
    blocks = x.reshape(2, 2, 4, 3, 4, 3)
    top = blocks.max(axis=(2, 4))
    hit = blocks == top[:, :, None, :, None]
    assert (hit.sum(axis=(2, 4)) > 1).any()  # the case is tested
    want = (hit * (g / hit.sum(axis=(2, 4)))[:, :, None, :, None]).reshape(x.shape)
    got = jax.grad(lambda x: jnp.sum(block_max(x, 4) * g))(jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(np.asarray(block_max(jnp.asarray(x), 4)), top)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


# Runs in a subprocess: XLA's flags are read when it starts.
SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from sasa_jax.models import AttentionStem

    stem = AttentionStem(2, 16, values="stand_alone", num_heads=2, rngs=nnx.Rngs(0))
    stem.train()
    graphdef, state = nnx.split(stem)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 12, 20, 2)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 5, 16)), jnp.float32)

    @jax.jit
    def run(state, x):
        module = nnx.merge(graphdef, state)
        loss = lambda m, x: (jnp.sum(m(x) * weights), m(x))
        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(module, x)
        return out, grads.norm.bias[...]

    out, bias_grad = run(state, x)
    # The bias moves each pooled output that the ReLU passes by one.
    want = (np.asarray(weights) * (np.asarray(out) > 0)).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(bias_grad), want, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_stem_gradient_at_optimisation_level_zero():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")
