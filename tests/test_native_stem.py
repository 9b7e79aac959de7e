"""The attention stem's C++ CPU kernel (``attention.native_stem``): outputs and gradients
against an independent float64 reference (projections in NumPy, then the per-tile reference
attention), each image's numbers independent of the batch it is in, the layer taking it on
CPU with the numbers of its map path, and a batch-sharded jit running it on each device's
images."""

from __future__ import annotations

import json

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
from python_run import run_python

from sasa_jax.attention import native_build, native_stem
from sasa_jax.nn import StemAttention

pytestmark = pytest.mark.skipif(not native_stem.available(), reason="no C++ compiler here")


def _ours(arrays, heads, block):
    *inputs, c_out = arrays

    def loss(x, *weights):
        out = native_stem.stem_attention(x, *weights, heads=heads, block=block)
        return jnp.sum(out * c_out), out

    step = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)
    (_, out), grads = jax.jit(step)(*(jnp.asarray(a) for a in inputs))
    return out, grads


# (image, input channels, width, heads, block, batch): the digits' grey stem (4 heads of 4),
# RGB at 2 heads of 8, odd blocks and head counts, a batch of two lane groups (8 + 3 images).
CASES = [
    ((8, 12), 1, 16, 4, 4, 2),
    ((8, 8), 3, 16, 2, 4, 3),
    ((9, 6), 3, 12, 3, 3, 2),
    ((4, 6), 2, 8, 2, 2, 11),
    ((5, 10), 1, 4, 1, 5, 1),
]


@pytest.mark.parametrize(
    "image, cin, width, heads, block, batch",
    CASES,
    ids=["grey-4heads", "rgb", "block3-3heads", "batch11", "block5-1head"],
)
def test_kernel_matches_the_reference(image, cin, width, heads, block, batch):
    arrays = stem_arrays(image, cin, width, heads, block, batch=batch)
    ref_out, ref_grads = reference_stem_attention_np(*arrays, heads, block)
    out, grads = _ours(arrays, heads, block)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_images_numbers_do_not_depend_on_its_batch():
    """The kernel puts 8 images in a vector's lanes: image 9 of a batch of 11 (the second,
    partial group) gets the same bits as alone, and so does its share of the gradients."""
    arrays = stem_arrays((8, 8), 3, 16, 2, 4, batch=11, seed=3)
    alone = [a[9:10] if a.ndim == 4 else a for a in arrays]
    out, grads = _ours(arrays, 2, 4)
    out_alone, grads_alone = _ours(alone, 2, 4)
    np.testing.assert_array_equal(out[9:10], out_alone)
    np.testing.assert_array_equal(grads[0][9:10], grads_alone[0])
    # The weights' gradients of the batch are the sum of its images' (the other images' too).
    others = [a[:9] if a.ndim == 4 else a for a in arrays]
    rest = [a[10:] if a.ndim == 4 else a for a in arrays]
    for index in range(1, 6):
        summed = _ours(others, 2, 4)[1][index] + grads_alone[index] + _ours(rest, 2, 4)[1][index]
        np.testing.assert_allclose(grads[index], summed, rtol=1e-5, atol=1e-5)


def _custom_calls(fn, *args) -> dict[str, int]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    targets = (native_build.STEM_FORWARD_TARGET, native_build.STEM_BACKWARD_TARGET)
    lines = [line for line in text.splitlines() if "custom-call" in line]
    return {t: sum(t in line for line in lines) for t in targets}


@pytest.mark.parametrize("values", ["spatially_aware", "stand_alone"])
def test_the_layer_takes_the_kernel_with_its_map_paths_numbers(values):
    """``StemAttention`` ("auto", on CPU) runs the kernel's forward and backward, and gives
    the output and parameter gradients of its map path (``block_attention``, "gather")."""

    def layer(implementation):
        return StemAttention(
            1, 16, num_heads=4, values=values, implementation=implementation, rngs=nnx.Rngs(0)
        )

    x = jax.random.normal(jax.random.key(1), (3, 8, 12, 1))
    c_out = jax.random.normal(jax.random.key(2), (3, 8, 12, 16))
    results = []
    for implementation in ("auto", "gather"):
        graphdef, params = nnx.split(layer(implementation))
        params = jax.tree.map(lambda p: p + 0.3, params)  # W_Q away from its zero start

        def loss(params, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params)(x) * c_out)

        step = jax.value_and_grad(loss, argnums=(0, 1))
        calls = _custom_calls(step, params, x)
        results.append((jax.jit(step)(params, x), calls))
    (ours, calls), (theirs, none) = results
    assert list(calls.values()) == [1, 1] and list(none.values()) == [0, 0]
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    chex.assert_trees_all_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)


def test_the_layer_keeps_its_map_path_where_the_kernel_does_not_apply():
    """Convolutional values, another implementation, heads too wide and captured weights run
    on the map."""
    x = jnp.ones((1, 8, 8, 3))
    wide = 2 * (native_stem.MAX_HEAD + 2)  # two heads wider than the kernel takes
    cases = [
        {"values": "spatial_conv_values"},
        {"implementation": "tiled"},
        {"out_features": wide},
    ]
    for kwargs in cases:
        layer = StemAttention(3, **{"out_features": 16, **kwargs}, num_heads=2, rngs=nnx.Rngs(0))
        assert not layer.takes_native(x.shape), kwargs
    layer = StemAttention(3, 16, num_heads=2, rngs=nnx.Rngs(0))
    assert layer.takes_native(x.shape)
    layer.capture = True
    assert not layer.takes_native(x.shape)


def test_vmap_runs_one_call_per_slice():
    """Under ``jax.vmap`` over a leading axis of the input, each slice's output and weights'
    gradients are those of a call on it alone."""
    arrays = stem_arrays((8, 8), 3, 16, 2, 4)
    assert_stem_vmap_is_per_slice(native_stem.stem_attention, arrays, heads=2, block=4)


def test_bad_arguments_are_refused():
    x, wq, wk, wv, rel_row, rel_col, _ = stem_arrays((8, 8), 3, 16, 2, 4)
    with pytest.raises(ValueError, match="multiples of 4"):
        native_stem.stem_attention(x[:, :6], wq, wk, wv, rel_row, rel_col, heads=2, block=4)
    with pytest.raises(ValueError, match="wv must be"):
        native_stem.stem_attention(x, wq, wk, wv[:-1], rel_row, rel_col, heads=2, block=4)
    with pytest.raises(ValueError, match="even width"):
        native_stem.stem_attention(x, wq, wk, wv, rel_row, rel_col, heads=16, block=4)
    wide = np.zeros((3, 2 * (native_stem.MAX_HEAD + 2)), np.float32)
    with pytest.raises(ValueError, match="at most"):
        native_stem.stem_attention(x, wide, wide, wv, rel_row, rel_col, heads=2, block=4)
    with pytest.raises(ValueError, match="block must be"):
        native_stem.stem_attention(x, wq, wk, wv, rel_row, rel_col, heads=2, block=0)


@pytest.mark.slow
def test_kernels_without_avx_give_the_references_numbers(tmp_path):
    """Built without AVX, AVX2 or FMA (a CPU without them, or another architecture: the
    kernels' vectors are the compiler's generic ones), the stem kernel still gives the
    reference's output and gradients, and the op's kernel builds beside it."""
    out = run_python(
        """
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        sys.path.insert(0, "tests")
        from attention_reference import reference_stem_attention_np, stem_arrays
        from sasa_jax.attention import native_build, native_stem

        *inputs, c_out = stem_arrays((8, 12), 3, 16, 2, 4, batch=9)

        def loss(*args):
            return jnp.sum(native_stem.stem_attention(*args, heads=2, block=4) * c_out)

        got = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*inputs)
        want = reference_stem_attention_np(*inputs, c_out, 2, 4)[1]
        print(json.dumps({
            "flags": native_build.compile_command("c++", [], "out"),
            "error": max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, want)),
        }))
        """,
        SASA_JAX_CACHE=str(tmp_path),
        SASA_JAX_CXXFLAGS="-mno-avx -mno-avx2 -mno-fma",
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert "-mno-avx2" in report["flags"], report
    assert report["error"] < 1e-3, report


def test_batch_sharded_jit_runs_each_devices_images():
    """Under ``jax.jit`` with the batch split over 2 devices, each device runs the kernel on
    its own 2 images (no all-gather of the input), the weights' gradients are summed over the
    devices, and the numbers are the reference's."""
    code = """
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        sys.path.insert(0, "tests")
        from attention_reference import reference_stem_attention_np, stem_arrays
        from sasa_jax.attention import native_stem

        mesh = Mesh(np.array(jax.devices()), ("data",))
        split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        *inputs, c_out = stem_arrays((8, 8), 3, 16, 2, 4, batch=4)

        def loss(x, *weights):
            out = native_stem.stem_attention(x, *weights, heads=2, block=4)
            return jnp.sum(out * c_out)

        step = jax.jit(jax.grad(loss, argnums=tuple(range(6))),
                       in_shardings=(split,) + (whole,) * 5)
        hlo = step.lower(*inputs).compile().as_text()
        calls = [l for l in hlo.splitlines() if 'custom_call_target="sasa_stem' in l]
        got = step(*inputs)
        want = reference_stem_attention_np(*inputs, c_out, 2, 4)[1]
        print(json.dumps({
            "gathers": hlo.count("all-gather"),
            "calls": len(calls),
            "local": all("f32[2,8,8,3]" in l for l in calls),
            "dx_sharding": list(got[0].sharding.spec),
            "error": max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, want)),
        }))
    """
    out = run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["gathers"] == 0, report
    assert report["calls"] == 2 and report["local"], report  # forward and backward
    assert report["dx_sharding"] == ["data"], report
    assert report["error"] < 1e-3, report
