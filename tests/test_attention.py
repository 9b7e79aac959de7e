"""local_attention: every implementation against the independent dense reference."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import (
    random_inputs,
    reference_attention_np,
    reference_block_attention_np,
)

import sasa_jax
from sasa_jax import local_attention
from sasa_jax.attention import BORDERS

# Every implementation: those offered on CPU ("auto" there is native, tested as itself) and
# the Pallas kernels in interpret mode: "pallas" (the GPU layout on CPU) and the TPU layout
# (conftest.py registers it as "pallas_tpu_interpret").
IMPLEMENTATIONS = [n for n in sasa_jax.attention_implementations("cpu") if n != "auto"]
IMPLEMENTATIONS += ["pallas", "pallas_tpu_interpret"]


# (image, window, dilation): odd, even and rectangular windows, dilation, and images smaller
# than the window (mask and zeros only: clamp needs the window to fit).
GEOMETRIES = [
    ((6, 7), 3, 1),
    ((6, 7), 4, 1),
    ((5, 6), (3, 5), 1),
    ((6, 5), (2, 1), 1),
    ((7, 6), 3, 2),
    ((7, 8), (2, 3), 3),
    ((2, 3), 5, 1),
    ((3, 2), (4, 7), 2),
]


def _fits(border, image, window, dilation):
    return border != "clamp" or (dilation == 1 and np.all(np.array(window) <= np.array(image)))


# Every geometry and border, with relative tables; without them and with the q·r-only logits
# (no keys) on the first geometry of each border. The first geometry of each border is in the
# quick set (-m "not slow"); the rest is marked slow.
CASES = [
    (border, image, window, dilation, rel)
    for (image, window, dilation), border in itertools.product(GEOMETRIES, BORDERS)
    if _fits(border, image, window, dilation)
    for rel in (("rel", "norel", "qr") if (image, window, dilation) == GEOMETRIES[0] else ("rel",))
]


def _case_id(case):
    border, image, window, dilation, rel = case
    return f"{border}-img{image[0]}x{image[1]}-win{window}-dil{dilation}-{rel}"


def _param(case):
    """The case, in the quick set or marked slow."""
    return pytest.param(case, id=_case_id(case), marks=() if _quick(case) else pytest.mark.slow)


def _cotangents(q, v, window):
    kh, kw = (window, window) if isinstance(window, int) else window
    rng = np.random.default_rng(2)
    c_out = rng.standard_normal(v.shape).astype(np.float32)
    c_w = rng.standard_normal(q.shape[:4] + (kh * kw,)).astype(np.float32)
    return c_out, c_w


def _grad_argnums(k):
    return (0, 1, 2, 3) if k is not None else (0, 2, 3)


def _outputs_and_grads(attend, q, k, v, tables, cotangents):
    """``(out, weights)`` and the gradients of ``sum(out * c_out) + sum(weights * c_w)`` with
    respect to q, k (when given), v and the tables, in one jitted function."""
    c_out, c_w = cotangents

    def loss(q, k, v, tables):
        out, weights = attend(q, k, v, tables)
        return jnp.sum(out * c_out) + jnp.sum(weights * c_w), (out, weights)

    step = jax.value_and_grad(loss, argnums=_grad_argnums(k), has_aux=True)
    (_, outputs), grads = jax.jit(step)(q, k, v, tables)
    return outputs, grads


def _output_and_grads(attend, q, k, v, tables, c_out):
    """``out`` and the gradients of ``sum(out * c_out)``, in one jitted function."""

    def loss(q, k, v, tables):
        out = attend(q, k, v, tables)
        return jnp.sum(out * c_out), out

    step = jax.value_and_grad(loss, argnums=_grad_argnums(k), has_aux=True)
    (_, out), grads = jax.jit(step)(q, k, v, tables)
    return out, grads


# Implementations whose weights come from their own pass (the others take gather's).
OWN_WEIGHTS = ("gather", "tiled", "dense")


def _quick(case) -> bool:
    return case[1:4] == GEOMETRIES[0] and case[4] == "rel"


def _grad_tree(grads, k, tables):
    """The NumPy reference's gradients in the structure of ``jax.grad``'s (q, k, v, tables)."""
    dq, dk, dv, d_row, d_col = grads
    d_tables = {"rel_row": d_row, "rel_col": d_col} if tables else {}
    return (dq, dv, d_tables) if k is None else (dq, dk, dv, d_tables)


@functools.cache
def _reference(case):
    """The float64 NumPy reference's output and weights, its gradients through the output
    alone and, for the quick cases, through the output and the weights."""
    border, image, window, dilation, rel = case
    q, k, v, tables = random_inputs(0, image, window, border, rel)
    c_out, c_w = _cotangents(q, v, window)
    static = dict(window=window, dilation=dilation, border=border)
    rel_row, rel_col = tables.get("rel_row"), tables.get("rel_col")
    out, weights, grads = reference_attention_np(
        q, k, v, rel_row, rel_col, c_out=c_out, c_w=np.zeros_like(c_w), **static
    )
    through_both = None
    if _quick(case):
        _, _, both = reference_attention_np(
            q, k, v, rel_row, rel_col, c_out=c_out, c_w=c_w, **static
        )
        through_both = _grad_tree(both, k, tables)
    return (out, weights), _grad_tree(grads, k, tables), through_both


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_matches_reference(implementation, case):
    """In one compiled function: the output and gradients of the implementation's own pass
    (the primitive's kernels; gather's windows), and the weights of its weights pass. On the
    quick cases, also the gradients through the weights where it computes them itself (the
    others take gather's weights, checked on every case by gather's own test)."""
    border, image, window, dilation, rel = case
    q, k, v, tables = random_inputs(0, image, window, border, rel)
    static = dict(window=window, dilation=dilation, border=border)
    c_out, c_w = _cotangents(q, v, window)
    (ref_out, ref_weights), ref_through_out, ref_through_both = _reference(case)
    argnums = _grad_argnums(k)
    own, quick = implementation in OWN_WEIGHTS, _quick(case)

    def attend(q, k, v, tables, weights):
        return local_attention(
            q, k, v, implementation=implementation, return_weights=weights, **tables, **static
        )

    def loss(q, k, v, tables, weight_term):
        out, weights = attend(q, k, v, tables, True)
        return jnp.sum(out * c_out) + weight_term * jnp.sum(weights * c_w), (out, weights)

    def everything(q, k, v, tables):
        results = {}
        if implementation == "gather":  # its one pass: output, weights, gradients
            (_, results["weights"]), results["grads"] = jax.value_and_grad(
                loss, argnums, has_aux=True
            )(q, k, v, tables, 0.0)
        else:
            results["out"], results["grads"] = (
                attend(q, k, v, tables, False),
                jax.grad(lambda *a: jnp.sum(attend(*a, False) * c_out), argnums)(q, k, v, tables),
            )
            if own or quick:
                results["weights"] = attend(q, k, v, tables, True)
        if own and quick:
            results["both"] = jax.grad(lambda *a: loss(*a, 1.0)[0], argnums)(q, k, v, tables)
        return results

    results = jax.jit(everything)(q, k, v, tables)
    if "out" in results:
        chex.assert_shape(results["out"], v.shape)
        chex.assert_trees_all_close(results["out"], ref_out, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(results["grads"], ref_through_out, atol=1e-3, rtol=1e-3)
    if "weights" in results:
        out, weights = results["weights"]
        chex.assert_shape(weights, q.shape[:4] + (ref_weights.shape[-1],))
        chex.assert_trees_all_close(out, ref_out, atol=1e-4, rtol=1e-4)
        chex.assert_trees_all_close(weights, ref_weights, atol=1e-4, rtol=1e-4)
    if "both" in results:
        chex.assert_trees_all_close(results["both"], ref_through_both, atol=1e-3, rtol=1e-3)


# (heads, dim, dim_v): the layer's head widths (8, 16, 32, 64 channels per head: the kernel's
# compile-time sizes), a head count that is not a multiple of 8, and unequal dim and dim_v.
HEAD_SHAPES = [(10, 8, 8), (8, 16, 16), (3, 32, 32), (1, 64, 64), (5, 6, 10)]


_HEAD_STATIC = dict(window=5, border="mask")


@functools.cache
def _head_case(heads, dim, dim_v):
    """Inputs, a cotangent, and the reference's output and gradients (computed once)."""
    q, k, v, tables = random_inputs(4, (5, 9), 5, "mask", "rel", heads=heads, dim=dim, dim_v=dim_v)
    cotangent = np.random.default_rng(6).standard_normal(v.shape).astype(np.float32)
    out, _, grads = reference_attention_np(
        q,
        k,
        v,
        tables["rel_row"],
        tables["rel_col"],
        dilation=1,
        c_out=cotangent,
        c_w=np.zeros(q.shape[:4] + (25,)),
        **_HEAD_STATIC,
    )
    return (q, k, v, tables, cotangent), (out, _grad_tree(grads, k, tables))


# The kernels have code per channel count (the C++ kernel's compile-time sizes, the Pallas
# layouts' padding); the pure-JAX implementations do not.
@pytest.mark.parametrize("implementation", ["native", "pallas", "pallas_tpu_interpret"])
@pytest.mark.parametrize("heads, dim, dim_v", HEAD_SHAPES, ids=lambda x: str(x))
def test_head_shapes_match_reference(implementation, heads, dim, dim_v):
    """Outputs and gradients for head counts and widths beyond the small cases above."""
    (q, k, v, tables, cotangent), (ref_out, ref_grads) = _head_case(heads, dim, dim_v)

    def attend(q, k, v, tables):
        return local_attention(q, k, v, implementation=implementation, **tables, **_HEAD_STATIC)

    out, grads = _output_and_grads(attend, q, k, v, tables, cotangent)
    chex.assert_trees_all_close(out, ref_out, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_stays_close(implementation, dtype):
    """bf16 and f16 inputs: an output in that dtype within 5e-2 of the f32 reference on the
    same (rounded) inputs, and float32 weights that sum to 1."""
    dtype = jnp.dtype(dtype)
    q, k, v, tables = random_inputs(3, (8, 8), 5, "mask", "rel", dim=8, dim_v=8)
    inputs = [x.astype(dtype) for x in (q, k, v)]
    kwargs = dict(window=5, **{n: t.astype(dtype) for n, t in tables.items()})
    out, weights = jax.jit(
        lambda q, k, v: local_attention(
            q, k, v, implementation=implementation, return_weights=True, **kwargs
        )
    )(*inputs)
    assert out.dtype == dtype
    assert weights.dtype == jnp.float32
    rounded = [np.float32(x) for x in inputs]
    ref_out, ref_weights, _ = reference_attention_np(
        *rounded,
        np.float32(kwargs["rel_row"]),
        np.float32(kwargs["rel_col"]),
        window=5,
        dilation=1,
        border="mask",
        c_out=rounded[2],
        c_w=np.zeros(q.shape[:4] + (25,)),
    )
    np.testing.assert_allclose(np.float32(out), ref_out, atol=5e-2, rtol=5e-2)
    np.testing.assert_allclose(weights, ref_weights, atol=2e-2)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("border", ["mask", "clamp"])
def test_large_negative_logits_keep_masked_keys_out(implementation, border):
    """Every in-window logit near -1e6: a mask that were only a large finite penalty (say
    -1e4) would let the masked keys win the softmax. Checked against the reference's -inf."""
    q, k, v, tables = random_inputs(5, (6, 7), 3, border, "rel")
    q, k = 30.0 * jnp.abs(q) + 30.0, -30.0 * jnp.abs(k) - 30.0  # q·k in about [-1e6, -1e3]

    def ours(q, k, v, tables):
        kwargs = dict(window=3, border=border, implementation=implementation)
        out = local_attention(q, k, v, **kwargs, **tables)
        return out, local_attention(q, k, v, return_weights=True, **kwargs, **tables)[1]

    out, weights = jax.jit(ours)(q, k, v, tables)
    zeros = np.zeros(q.shape[:4] + (9,))
    ref_out, ref_weights, _ = reference_attention_np(
        q,
        k,
        v,
        tables["rel_row"],
        tables["rel_col"],
        window=3,
        dilation=1,
        border=border,
        c_out=v,
        c_w=zeros,
    )
    # Loose: float32 logits of 1e5-1e6 differ by ~0.01 between summation orders, which moves
    # a near tie's weights by up to ~1e-3; a masked key that won would move them by ~1.
    np.testing.assert_allclose(weights, ref_weights, atol=1e-2)
    np.testing.assert_allclose(out, ref_out, atol=1e-2)


# ------------------------------------------------------------------------ block attention

# (image, block, heads, dim): the stem's 4x4 blocks on a rectangular map, an odd block, and
# block 1 (each query alone).
BLOCK_CASES = [((8, 12), 4, 2, 8), ((6, 6), 3, 3, 4), ((4, 6), 1, 2, 4)]


def _block_inputs(image, heads, dim, block, rel, batch=2):
    rng = np.random.default_rng(7)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    shape = (batch, *image, heads, dim)
    q, k, v = normal(*shape), normal(*shape), normal(*shape)
    tables = {}
    if rel != "norel":
        tables = {name: normal(2 * block - 1, dim // 2) for name in ("rel_row", "rel_col")}
    tiles = batch * (image[0] // block) * (image[1] // block)
    cotangents = normal(*shape), normal(tiles, block, block, heads, block * block)
    return q, None if rel == "qr" else k, v, tables, cotangents


# "native", "pallas" and "tiled" run block_attention on the whole map with block windows:
# every block geometry with tables, and without tables or keys on the first. "gather" and
# "dense" run on cut-out tiles through their "clamp" path (the matrix above): one case.
WHOLE_MAP = ("native", "pallas", "pallas_tpu_interpret", "tiled")
BLOCK_RUNS = [
    (implementation, case, rel)
    for implementation in IMPLEMENTATIONS
    for case in BLOCK_CASES
    for rel in ("rel", "norel", "qr")
    if (rel == "rel" or case == BLOCK_CASES[0])
    and (implementation in WHOLE_MAP or (case, rel) == (BLOCK_CASES[0], "rel"))
]


def _block_param(run):
    implementation, case, rel = run
    name = f"{implementation}-img{case[0][0]}x{case[0][1]}-b{case[1]}-{rel}"
    quick = case == BLOCK_CASES[0] and rel == "rel"
    return pytest.param(*run, id=name, marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("implementation, case, rel", [_block_param(r) for r in BLOCK_RUNS])
def test_block_attention_matches_reference(implementation, case, rel):
    """Outputs and gradients of the implementation's own pass, and its weights (with the
    gradients through them where it computes them), against the per-tile reference."""
    image, block, heads, dim = case
    q, k, v, tables, (c_out, c_w) = _block_inputs(image, heads, dim, block, rel)
    q, v, c_out, c_w = (np.asarray(x) for x in (q, v, c_out, c_w))
    k = None if k is None else np.asarray(k)
    tables = {name: np.asarray(t) for name, t in tables.items()}

    def reference(c_w):
        return reference_block_attention_np(
            q, k, v, tables.get("rel_row"), tables.get("rel_col"), block, c_out=c_out, c_w=c_w
        )

    ref_out, ref_weights, ref_grads = reference(np.zeros_like(c_w))

    def ours(q, k, v, tables, weights=False):
        return sasa_jax.block_attention(
            q, k, v, block=block, implementation=implementation, return_weights=weights, **tables
        )

    out, grads = _output_and_grads(ours, q, k, v, tables, c_out)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, _grad_tree(ref_grads, k, tables), atol=1e-4, rtol=1e-4)
    with_weights = functools.partial(ours, weights=True)
    if implementation in WHOLE_MAP:  # weights from gather on the cut-out tiles
        got = jax.jit(with_weights)(q, k, v, tables)
    else:
        got, grads = _outputs_and_grads(with_weights, q, k, v, tables, (c_out, c_w))
        _, _, both = reference(c_w)
        chex.assert_trees_all_close(grads, _grad_tree(both, k, tables), atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(got, (ref_out, ref_weights), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("native" not in IMPLEMENTATIONS, reason="the C++ kernel is not built")
@pytest.mark.parametrize("implementation", ["native", "auto"])
def test_block_attention_runs_the_kernel_on_the_whole_map(implementation):
    """On CPU the kernel takes the blocks' window tables on the uncut map: its custom call
    sees [batch, height, width, ...], and no tiles are cut out (no transposes)."""
    q, k, v, tables, _ = _block_inputs((8, 12), 2, 8, 4, "rel")

    def ours(q, k, v, tables):
        return sasa_jax.block_attention(q, k, v, block=4, implementation=implementation, **tables)

    hlo = jax.jit(ours).lower(q, k, v, tables).as_text(dialect="hlo")
    calls = [line for line in hlo.splitlines() if "sasa_local_attention_forward" in line]
    assert len(calls) == 1 and "f32[2,8,12,2,8]" in calls[0], calls
    assert "transpose(" not in hlo


def test_block_attention_bad_arguments():
    q = jnp.zeros((1, 8, 6, 2, 4))
    with pytest.raises(ValueError, match="multiples of block"):
        sasa_jax.block_attention(q, q, q, block=4)
    with pytest.raises(ValueError, match="block must be an int"):
        sasa_jax.block_attention(q, q, q, block=0)
    with pytest.raises(ValueError, match=r"rel_row must have shape \(3, 2\)"):
        table = jnp.zeros((2, 2))
        sasa_jax.block_attention(q, q, q, block=2, rel_row=table, rel_col=table)
    with pytest.raises(ValueError, match="both"):
        sasa_jax.block_attention(q, q, q, block=2, rel_row=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="implementation"):
        sasa_jax.block_attention(q, q, q, block=2, implementation="nope")
    with pytest.raises(ValueError, match="border"):
        local_attention(q, q, q, window=2, border="blocks")  # not a border of local_attention
