"""Ordered cross-device means against numpy, their gradients against lax.pmean's, and the
trainer's batch norm with device-ordered statistics against flax's on the whole batch, on
its own and in the paper's stem as it runs on TPU (statistics taken on the kernel's tiles)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Runs in a subprocess: simulated devices must be set before JAX starts.
SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from sasa_jax import parallel

    n = jax.device_count()
    assert n == 4, n
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    # Odd sizes (the flattened tree does not divide by 4) and a bf16 leaf.
    a = rng.standard_normal((n, 3, 5)).astype(np.float32) * 1e3
    b = rng.standard_normal((n, 7)).astype(np.float32)
    c = rng.standard_normal((n, 2)).astype(jnp.bfloat16)

    def per_device(a, b, c):
        return parallel.ordered_mean({"a": a[0], "b": (b[0], c[0])}, "d")

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P(),
                              check_vma=False))
    out = f(a, b, c)
    np.testing.assert_allclose(out["a"], a.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["b"][0], b.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    assert out["b"][1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out["b"][1]), np.float32(c).mean(0), rtol=1e-2)

    # Every device holds the same bits.
    g = jax.jit(jax.shard_map(lambda a: parallel.ordered_mean(a[0], "d")[None], mesh=mesh,
                              in_specs=P("d"), out_specs=P("d"), check_vma=False))(a)
    shards = [np.asarray(s.data) for s in g.addressable_shards]
    assert all(np.array_equal(shards[0], s) for s in shards[1:])

    # Gradients through a mean of statistics, as batch norm uses it: against lax.pmean.
    x = rng.standard_normal((n, 6, 4)).astype(np.float32)
    w = rng.standard_normal((4,)).astype(np.float32)

    def loss(mean_fn):
        def device_loss(x, w):
            stats = mean_fn(jnp.stack([x.mean(0), (x * x).mean(0)]))
            y = (x - stats[0]) * jax.lax.rsqrt(stats[1] - stats[0] ** 2 + 1e-5) * w
            return jnp.sum(jnp.sin(y))
        def per_device(x, w):
            gx, gw = jax.grad(device_loss, argnums=(0, 1))(x[0], w)
            return gx[None], jax.lax.psum(gw, "d")[None]
        return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P()),
                                     out_specs=P("d"), check_vma=False))(x, w)

    got = loss(lambda s: parallel.ordered_mean_grad(s, "d"))
    want = loss(lambda s: jax.lax.pmean(s, "d"))
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    assert float(np.abs(np.asarray(got[0])).max()) > 0

    # The trainer's batch norm, per device under shard_map with device-ordered statistics,
    # against flax's on the whole batch in one device: outputs, running statistics and the
    # gradients of input, scale and offset.
    from flax import nnx
    from sasa_jax.nn.norm import BatchNorm, set_batch_axis

    images = rng.standard_normal((n * 2, 3, 3, 5)).astype(np.float32) * 2 + 1
    ordered = BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))
    set_batch_axis(ordered, "d")
    plain = nnx.BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))

    def norm_step(graphdef, state, x, axis=None):
        module = nnx.merge(graphdef, state)

        def f(module, x):
            return jnp.sum(jnp.sin(module(x)) * x)

        g_module, g_x = nnx.grad(f, argnums=(0, 1))(module, x)
        g_params = nnx.state(g_module, nnx.Param)
        if axis:  # each device holds its share of the parameters' gradient
            g_params = jax.lax.psum(g_params, axis)
        return nnx.state(module, nnx.BatchStat), g_params, g_x

    g_o, s_o = nnx.split(ordered)
    per_device = jax.shard_map(
        lambda s, x: norm_step(g_o, s, x, "d"), mesh=mesh, in_specs=(P(), P("d")),
        out_specs=(P(), P(), P("d")), check_vma=False)
    got = jax.jit(per_device)(s_o, images)
    g_p, s_p = nnx.split(plain)
    want = jax.jit(lambda s, x: norm_step(g_p, s, x))(s_p, images)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # The paper's stem as it runs on TPU (its batch norm's statistics and max pool on the
    # kernel's output tiles; the kernels in interpret mode here), per device with
    # device-ordered statistics, against its map path with flax's batch norm on the whole batch.
    from sasa_jax.models import AttentionStem
    from sasa_jax.nn.norm import Norm
    from sasa_jax.nn.stem_attention import _in_tiles, _on_map

    def stem_step(path, graphdef, state, x, axis=None):
        module = nnx.merge(graphdef, state)

        def f(module, x):
            return jnp.sum(jnp.sin(path(module.attention, module.norm, x)))

        g_module, g_x = nnx.grad(f, argnums=(0, 1))(module, x)
        g_params = nnx.state(g_module, nnx.Param)
        if axis:
            g_params = jax.lax.psum(g_params, axis)
        return nnx.state(module, nnx.BatchStat), g_params, g_x

    pixels = rng.standard_normal((n, 16, 32, 3)).astype(np.float32)
    stem = lambda norm: AttentionStem(3, 16, num_heads=2, norm=norm, rngs=nnx.Rngs(0))
    ordered = stem(Norm(momentum=0.5, layer=BatchNorm))
    set_batch_axis(ordered, "d")
    g_o, s_o = nnx.split(ordered)
    per_device = jax.shard_map(
        lambda s, x: stem_step(_in_tiles, g_o, s, x, "d"), mesh=mesh, in_specs=(P(), P("d")),
        out_specs=(P(), P(), P("d")), check_vma=False)
    got = jax.jit(per_device)(s_o, pixels)
    g_p, s_p = nnx.split(stem(Norm(momentum=0.5)))
    want = jax.jit(lambda s, x: stem_step(_on_map, g_p, s, x))(s_p, pixels)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    print("ok")
    """
)


def test_ordered_means_match_numpy_and_pmean_gradients():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")
