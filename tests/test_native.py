"""The "native" C++ kernel: it builds here, caches, can be switched off, and its numbers do
not depend on the number of threads. Its numerics against the reference are in
test_attention.py, which runs every implementation through the same tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from python_run import run_python

import sasa_jax
from sasa_jax.attention import axis_window, native, native_build

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_builds_with_this_machines_compiler():
    """CI and the development machines have a C++ compiler: the kernel must build there, or
    every test of it would silently fall back to "tiled"."""
    assert native_build.library() is not None, "the kernel did not build (see the warning)"
    assert "native" in sasa_jax.attention_implementations("cpu")


@pytest.mark.slow
def test_build_is_cached_and_reused(tmp_path):
    """The first use compiles into the cache directory; a second process loads that file.
    (An unoptimised -O0 build: the flags are part of the cache key, so it is a build of its
    own, and it takes a quarter of the time.)"""
    code = """
        import jax.numpy as jnp, sasa_jax
        q = jnp.ones((1, 5, 5, 2, 4))
        print(float(sasa_jax.local_attention(q, q, q, window=3, implementation="native").sum()))
    """
    env = dict(SASA_JAX_CACHE=str(tmp_path), SASA_JAX_CXXFLAGS="-O0")
    first = run_python(code, **env)
    built = sorted(tmp_path.glob("sasa_cpu_kernel_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    load = "from sasa_jax.attention import native_build; print(native_build.library() is not None)"
    assert run_python(load, **env).strip() == "True"
    assert sorted(tmp_path.glob("sasa_cpu_kernel_*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp
    assert float(first) == 200.0  # all-ones values: every output is 1
    assert not list(tmp_path.glob("tmp*")), "a temporary build directory was left behind"


def test_switched_off_by_environment():
    """SASA_JAX_NATIVE=0: the kernel is not offered and auto falls back to pure JAX."""
    out = run_python(
        """
        import json, sasa_jax
        from sasa_jax.attention import auto_choice, axis_window
        w = axis_window(56, 7, 1, "mask")
        print(json.dumps([sasa_jax.attention_implementations("cpu"),
                          auto_choice((8, 56, 56, 8, 8), w, w, backend="cpu")]))
        """,
        SASA_JAX_NATIVE="0",
    )
    names, choice = json.loads(out.strip().splitlines()[-1])
    assert "native" not in names and "tiled" in names
    assert choice == "tiled"


def test_same_bits_for_any_number_of_threads(monkeypatch):
    """Each output element is computed by one work item in a fixed order, so one thread and
    several give identical outputs and gradients (relative tables included)."""
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(ks[i], (3, 9, 11, 10, 8)) for i in range(3))
    rr, rc = (jax.random.normal(ks[3 + i], (5, 4)) for i in range(2))

    def loss(q, k, v, rr, rc):
        out = sasa_jax.local_attention(
            q, k, v, window=5, rel_row=rr, rel_col=rc, implementation="native"
        )
        return jnp.sum(out * jnp.cos(out)), out

    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(native, "MAX_WORKERS", workers)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
        (_, out), grads = step(q, k, v, rr, rc)
        results.append(np.concatenate([np.ravel(x) for x in (out, *grads)]))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def _workspace(batch, size, heads, dim, window=7, workers=2, backward=False):
    win = axis_window(size, window, 1, "mask")
    geometry = native.Geometry(win.spec, win.spec, True, True, workers)
    return native.workspace_shape(
        geometry, (batch, size, size, heads, dim), dim, (window, window), backward
    )


def test_the_kernel_sizes_its_scratch_and_splits_its_work_over_every_worker():
    """The workspace shape comes from the kernel (one slot per worker that gets items): at
    every ResNet-50 stage, batch 8, the forward and backward passes use every worker, the 7x7
    stage included, on 2 cores as on 16."""
    for size, dim in ((56, 8), (28, 16), (14, 32), (7, 64)):
        for workers in (2, 16):
            forward = _workspace(8, size, 8, dim, workers=workers)[0]
            backward = _workspace(8, size, 8, dim, workers=workers, backward=True)[0]
            assert forward == workers, (size, workers)
            # The backward pass splits no image: 8 images x 8 heads are 8 lane groups.
            assert backward == min(workers, 8), (size, workers)
    # The scratch grows with the rows a window keeps alive: 7 rows at window 7, 3 at 3.
    assert _workspace(1, 14, 8, 8, window=7)[1] > _workspace(1, 14, 8, 8, window=3)[1]


def test_batch_sharded_jit_runs_each_devices_images():
    """Under ``jax.jit`` with the batch split over 2 devices, each device runs the kernel on
    its own 2 images (no all-gather of q, k or v), the table gradients are summed over the
    devices, and the numbers are the reference's."""
    out = run_python(
        """
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        sys.path.insert(0, "tests")
        from attention_reference import reference_attention
        import sasa_jax

        mesh = Mesh(np.array(jax.devices()), ("data",))
        split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        ks = jax.random.split(jax.random.key(1), 6)
        q, k, v = (jax.random.normal(ks[i], (4, 9, 10, 8, 8)) for i in range(3))
        rr, rc = (jax.random.normal(ks[3 + i], (5, 4)) for i in range(2))
        cot = jax.random.normal(ks[5], v.shape)

        def loss(attend, q, k, v, rr, rc):
            out = attend(q, k, v, window=5, rel_row=rr, rel_col=rc)
            return jnp.sum((out[0] if isinstance(out, tuple) else out) * cot)

        def ours(*a, **kw):
            return sasa_jax.local_attention(*a, implementation="native", **kw)

        grad = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3, 4))
        step = jax.jit(grad, in_shardings=(split,) * 3 + (whole,) * 2)
        hlo = step.lower(q, k, v, rr, rc).compile().as_text()
        calls = [l for l in hlo.splitlines() if 'custom_call_target="sasa_local' in l]
        got = step(q, k, v, rr, rc)
        want = jax.grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2, 3, 4))(
            q, k, v, rr, rc)
        print(json.dumps({
            "gathers": hlo.count("all-gather"),
            "calls": len(calls),
            "local": all("f32[2,9,10,8,8]" in l for l in calls),
            "dq_sharding": list(got[0].sharding.spec),
            "error": max(float(jnp.abs(a - b).max()) for a, b in zip(got, want)),
            "scale": max(float(jnp.abs(b).max()) for b in want),
        }))
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["gathers"] == 0, report
    assert report["calls"] == 2 and report["local"], report  # forward and backward, 2 images
    assert report["dq_sharding"] == ["data"], report
    assert report["error"] < 1e-3 * max(1.0, report["scale"]), report


def test_vmap_maps_the_kernel_over_the_extra_axis():
    """``jax.vmap`` over a leading axis (of q only; k, v and the tables shared) gives each
    slice's own output and gradients, as the reference computes them one slice at a time."""

    sys.path.insert(0, str(ROOT / "tests"))
    from attention_reference import reference_attention

    ks = jax.random.split(jax.random.key(2), 6)
    qs = jax.random.normal(ks[0], (3, 2, 7, 6, 4, 8))
    k, v = (jax.random.normal(ks[1 + i], (2, 7, 6, 4, 8)) for i in range(2))
    rr, rc = (jax.random.normal(ks[3 + i], (3, 4)) for i in range(2))
    cot = jax.random.normal(ks[5], v.shape)

    def loss(attend, q, rr):
        out = attend(q, k, v, window=3, border="zeros", rel_row=rr, rel_col=rc)
        return jnp.sum((out[0] if isinstance(out, tuple) else out) * cot)

    def ours(*a, **kw):
        return sasa_jax.local_attention(*a, implementation="native", **kw)

    got = jax.jit(
        jax.vmap(jax.value_and_grad(lambda q, rr: loss(ours, q, rr), (0, 1)), in_axes=(0, None))
    )(qs, rr)
    for i in range(qs.shape[0]):
        want = jax.value_and_grad(lambda q, rr: loss(reference_attention, q, rr), (0, 1))(qs[i], rr)
        np.testing.assert_allclose(got[0][i], want[0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got[1][0][i], want[1][0], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got[1][1][i], want[1][1], rtol=1e-3, atol=1e-3)
