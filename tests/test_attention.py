"""local_attention: every implementation against the independent dense reference."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import (
    reference_attention,
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


def _inputs(seed, image, window, border, rel, batch=2, heads=2, dim=4, dim_v=3):
    """q, k (None for "qr"), v and the tables ({} for "norel"), float32 NumPy arrays."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    h, w = image
    kh, kw = (window, window) if isinstance(window, int) else window
    q, k = normal(batch, h, w, heads, dim), normal(batch, h, w, heads, dim)
    v = normal(batch, h, w, heads, dim_v)
    tables = {}
    if rel != "norel":
        lr, lc = (2 * kh - 1, 2 * kw - 1) if border == "clamp" else (kh, kw)
        tables = {"rel_row": normal(lr, dim // 2), "rel_col": normal(lc, dim // 2)}
    return q, None if rel == "qr" else k, v, tables


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
    q, k, v, tables = _inputs(0, image, window, border, rel)
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
    q, k, v, tables = _inputs(0, image, window, border, rel)
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
    q, k, v, tables = _inputs(4, (5, 9), 5, "mask", "rel", heads=heads, dim=dim, dim_v=dim_v)
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
    q, k, v, tables = _inputs(3, (8, 8), 5, "mask", "rel", dim=8, dim_v=8)
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
    q, k, v, tables = _inputs(5, (6, 7), 3, border, "rel")
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


# The contract by hand, on the default implementation (the matrix above carries it to the
# others) and on the reference (which the matrix trusts).
HAND = {
    "auto": functools.partial(local_attention, implementation="auto"),
    "reference": lambda *a, **kw: reference_attention(*a, **kw)[0],
}


@pytest.mark.parametrize("attend", list(HAND))
def test_border_semantics_by_hand(attend):
    """A 1x3 image, window 3, q = 0 (uniform logits): the averages each border implies."""
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1, 1)
    q = jnp.zeros((1, 1, 3, 1, 2))
    avg = {
        border: HAND[attend](q, q, v, window=(1, 3), border=border)[0, 0, :, 0, 0]
        for border in ("mask", "zeros", "clamp")
    }
    np.testing.assert_allclose(avg["mask"], [5.5, 37.0, 55.0], rtol=1e-6)
    np.testing.assert_allclose(avg["zeros"], [11 / 3, 37.0, 110 / 3], rtol=1e-6)
    np.testing.assert_allclose(avg["clamp"], [37.0, 37.0, 37.0], rtol=1e-6)


@pytest.mark.parametrize("attend", list(HAND))
def test_even_window_reaches_one_more_before(attend):
    """Window 2 on a 1x3 image: query j sees columns j-1 and j (contract: kh//2 before)."""
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1, 1)
    q = jnp.zeros((1, 1, 3, 1, 2))
    out = HAND[attend](q, q, v, window=(1, 2), border="mask")
    np.testing.assert_allclose(out[0, 0, :, 0, 0], [1.0, 5.5, 55.0], rtol=1e-6)


@pytest.mark.parametrize("attend", list(HAND))
def test_relative_logits_pick_the_right_offset(attend):
    """A single large row embedding at offset +1 makes every query copy the pixel below it."""
    h, w = 4, 3
    v = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1, 1)
    q = jnp.ones((1, h, w, 1, 2))
    rel_row = jnp.array([[0.0], [0.0], [50.0]])  # offsets -1, 0, +1
    rel_col = jnp.array([[0.0], [30.0], [0.0]])  # prefer offset 0
    out = HAND[attend](
        q, jnp.zeros_like(q), v, window=3, rel_row=rel_row, rel_col=rel_col, border="mask"
    )
    below = np.arange(h * w, dtype=np.float32).reshape(h, w)[1:]
    np.testing.assert_allclose(out[0, :-1, :, 0, 0], below, atol=1e-4)


def test_gather_fits_the_paper_layer_size():
    """Shapes only (eval_shape): the full-size fwd+bwd run is in benchmarks/attention.py."""
    q = jax.ShapeDtypeStruct((8, 56, 56, 8, 8), jnp.float32)
    rel = jax.ShapeDtypeStruct((7, 4), jnp.float32)
    out = jax.eval_shape(
        lambda q, r: local_attention(q, q, q, window=7, rel_row=r, rel_col=r), q, rel
    )
    chex.assert_shape(out, (8, 56, 56, 8, 8))


def _good():
    q = jnp.zeros((1, 5, 5, 2, 4))
    return q, q, jnp.zeros((1, 5, 5, 2, 3))


BAD_ARGUMENTS = {
    "window below 1": (dict(window=0), "window"),
    "window of three": (dict(window=(3, 3, 3)), "window"),
    "window not int": (dict(window=2.5), "window"),
    "dilation below 1": (dict(window=3, dilation=0), "dilation"),
    "unknown border": (dict(window=3, border="reflect"), "border"),
    "unknown implementation": (dict(window=3, implementation="magic"), "implementation"),
    "only rel_row": (dict(window=3, rel_row=jnp.zeros((3, 2))), "rel_row"),
    "only rel_col": (dict(window=3, rel_col=jnp.zeros((3, 2))), "rel_col"),
    "rel_row wrong length": (
        dict(window=3, rel_row=jnp.zeros((5, 2)), rel_col=jnp.zeros((3, 2))),
        "rel_row",
    ),
    "rel_col wrong length": (
        dict(window=3, rel_row=jnp.zeros((3, 2)), rel_col=jnp.zeros((4, 2))),
        "rel_col",
    ),
    "rel table wrong width": (
        dict(window=3, rel_row=jnp.zeros((3, 3)), rel_col=jnp.zeros((3, 2))),
        "rel_row",
    ),
    "clamp rel of centred length": (
        dict(window=3, border="clamp", rel_row=jnp.zeros((3, 2)), rel_col=jnp.zeros((3, 2))),
        "rel_row",
    ),
    "clamp window larger than image": (dict(window=(6, 3), border="clamp"), "clamp"),
    "clamp with dilation": (dict(window=3, dilation=2, border="clamp"), "clamp"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error(name):
    kwargs, match = BAD_ARGUMENTS[name]
    with pytest.raises(ValueError, match=match):
        local_attention(*_good(), **kwargs)


def test_odd_dim_with_rel_tables_raises():
    q = jnp.zeros((1, 5, 5, 2, 3))
    with pytest.raises(ValueError, match="even dim"):
        local_attention(q, q, q, window=3, rel_row=jnp.zeros((3, 1)), rel_col=jnp.zeros((3, 1)))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 5, 5, 2, 4), (1, 5, 5, 2, 4), (1, 5, 4, 2, 3)), "v must"),
        (((1, 5, 5, 2, 4), (1, 5, 5, 2, 2), (1, 5, 5, 2, 3)), "k must"),
        (((1, 5, 5, 8), (1, 5, 5, 8), (1, 5, 5, 8)), "q must"),
    ],
)
def test_disagreeing_shapes_raise(shapes, match):
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        local_attention(q, k, v, window=3)


def test_errors_come_before_tracing_under_jit():
    """Inside jit the ValueError still comes from the argument check, not from XLA."""

    @jax.jit
    def f(q):
        return local_attention(q, q, q, window=3, border="clamp")

    with pytest.raises(ValueError, match="clamp"):
        f(jnp.zeros((1, 2, 2, 1, 2)))


def test_implementations_listed():
    for backend in (None, "cpu"):
        assert {"auto", "dense", "gather", "native", "tiled"} <= set(
            sasa_jax.attention_implementations(backend)
        )
    # The C++ kernel is for XLA's CPU backend only; the Pallas kernels for GPU and TPU (on CPU
    # they run in interpret mode when asked for by name).
    for backend in ("gpu", "tpu"):
        names = sasa_jax.attention_implementations(backend)
        assert "pallas" in names and "native" not in names
    assert "pallas" not in sasa_jax.attention_implementations("cpu")


CHUNKING = {
    # (implementation, module, {constant: value}): force each way an implementation splits
    # a batch (for tiled and dense: into loop steps of whole images, of rows of tiles, or of
    # some heads of one row), and "tiled" into many small, overhanging tiles.
    # A budget of 1 logit: one image, one row of tiles and one head per step.
    "dense-loop": ("dense", "tiles", {"CHUNK_ELEMENTS": 1}),
    "tiled-2x2-loop": ("tiled", "tiles", {"CHUNK_ELEMENTS": 1, "TILE": 2}),
    # 4 rows of 2x2 tiles (the last overhangs the map), room for 3 per step: 2 per step.
    "tiled-2x2-two-rows": ("tiled", "tiles", {"CHUNK_ELEMENTS": 3 * 384, "TILE": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(CHUNKING))
@pytest.mark.parametrize("border", ["mask"])
def test_batch_chunks_match_reference(setting, border, monkeypatch):
    """Chunked batches give the reference's outputs, weights and gradients: through the
    output alone (an implementation's own backward pass, where it has one) and through the
    output and the returned weights."""
    implementation, module_name, constants = CHUNKING[setting]
    module = getattr(sasa_jax.attention, module_name)
    for name, value in constants.items():
        monkeypatch.setattr(module, name, value)
    q, k, v, tables = _inputs(3, (7, 6), 3, border, "rel", batch=3)
    out_cot = jax.random.normal(jax.random.key(4), v.shape)
    w_cot = jax.random.normal(jax.random.key(5), q.shape[:4] + (9,))

    def loss(fn, q, k, v, tables):
        out, weights = fn(q, k, v, window=3, border=border, **tables)
        return jnp.sum(out * out_cot) + jnp.sum(weights * w_cot), (out, weights)

    def ours(*a, **kw):
        return local_attention(*a, implementation=implementation, return_weights=True, **kw)

    (_, got), grads = jax.jit(
        jax.value_and_grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3), has_aux=True)
    )(q, k, v, tables)
    (_, want), ref_grads = jax.jit(
        jax.value_and_grad(
            lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2, 3), has_aux=True
        )
    )(q, k, v, tables)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-3, rtol=1e-3)

    def out_loss(q, k, v, tables):
        out = local_attention(
            q, k, v, window=3, border=border, implementation=implementation, **tables
        )
        return jnp.sum(out * out_cot)

    def ref_out_loss(q, k, v, tables):
        return jnp.sum(reference_attention(q, k, v, window=3, border=border, **tables)[0] * out_cot)

    chex.assert_trees_all_close(
        jax.jit(jax.grad(out_loss, argnums=(0, 1, 2, 3)))(q, k, v, tables),
        jax.jit(jax.grad(ref_out_loss, argnums=(0, 1, 2, 3)))(q, k, v, tables),
        atol=1e-3,
        rtol=1e-3,
    )


def test_tiled_steps_take_rows_of_tiles_that_divide_the_image(monkeypatch):
    """The step sizing behind "tiled-2x2-two-rows": a 7x6 map has 4 rows of 2x2 tiles of
    3 tiles x 4 queries x 16 halo keys x 2 heads = 384 logits each. Room for 3 rows: steps
    of 2 (a divisor of 4, so no row of tiles is padded); for 3 images: whole images."""
    from sasa_jax.attention import axis_window, tiles

    rows, cols = axis_window(7, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", 3 * 384)
    p = tiles.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (1, 2, 4, 6)
    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", 3 * 4 * 384)
    p = tiles.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (3, 4, 4, 1)


def test_steps_split_heads_when_a_row_of_tiles_does_not_fit(monkeypatch):
    """A row of 2x2 tiles of a 5x6 map holds 3 tiles x 4 queries x 16 halo keys = 192 logits
    per head: with 6 heads and room for 400 logits, a step takes 2 heads of one row."""
    from sasa_jax.attention import axis_window, tiles

    rows, cols = axis_window(5, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", 400)
    p = tiles.plan(rows, cols, 2, batch=3, heads=6)
    assert (p.images, p.tile_rows, p.heads, p.head_steps, p.steps) == (1, 1, 2, 3, 27)
    # The steps visit every (image, row of tiles, group of heads) once.
    origins = {tuple(int(i) for i in p.origin(jnp.asarray(s))) for s in range(p.steps)}
    assert origins == {(i, r, h) for i in range(3) for r in range(3) for h in (0, 2, 4)}


def test_auto_picks_by_backend_and_map_size_and_takes_new_rules(monkeypatch):
    from sasa_jax.attention import add_auto_rule, auto_choice, axis_window
    from sasa_jax.attention.registry import _REGISTRY

    def windows(size, window=7):
        return axis_window(size, window, 1, "mask"), axis_window(size, window, 1, "mask")

    stages = [(7, 64), (14, 32), (28, 16), (56, 8)]
    # CPU: the C++ kernel wherever it can be built (it can, on this project's machines); GPU
    # and TPU: the Pallas kernels.
    for size, dim in stages:
        shape = (8, size, size, 8, dim)
        assert auto_choice(shape, *windows(size), backend="cpu") == "native"
        assert auto_choice(shape, *windows(size), backend="gpu") == "pallas"
        assert auto_choice(shape, *windows(size), backend="tpu") == "pallas"
    # A GPU before Ampere cannot run Pallas's Triton kernels: "auto" passes them over there.
    for capability, expected in (("7.5", "tiled"), ("7.0", "tiled"), ("8.0", "pallas")):
        gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability)
        assert auto_choice((8, 28, 28, 8, 16), *windows(28), "gpu", gpu) == expected, capability
    # Without them: dense on small maps, tiled on large ones (on GPU dense only where the map
    # fits in one window, as measured on an H100).
    for name in ("native", "pallas"):
        impl = dataclasses.replace(_REGISTRY[name], available=lambda backend: False)
        monkeypatch.setitem(_REGISTRY, name, impl)
    expected = {"cpu": ["dense", "dense", "tiled", "tiled"], "gpu": ["dense"] + ["tiled"] * 3}
    for backend, names in expected.items():
        got = [auto_choice((8, s, s, 8, d), *windows(s), backend=backend) for s, d in stages]
        assert got == names, backend
    # A new kernel registers a rule for its backend; unregistered names are skipped.
    add_auto_rule("test-backend", "no-such-kernel", lambda *_: True)
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="test-backend") == "tiled"
    add_auto_rule("test-backend", "gather", lambda shape, rows, cols: rows.size == 56)
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="test-backend") == "gather"
    assert auto_choice((8, 28, 28, 8, 16), *windows(28), backend="test-backend") == "tiled"


def test_auto_is_chosen_per_lowering_platform():
    """One traced function: lowered for CPU it runs the C++ kernel, exported for TPU or CUDA
    the Pallas kernel (Mosaic, Triton) and nothing of the CPU's."""
    q = jax.ShapeDtypeStruct((2, 8, 8, 8, 8), jnp.float32)
    rel = jax.ShapeDtypeStruct((3, 4), jnp.float32)

    def f(q, rel):
        return local_attention(q, q, q, window=3, rel_row=rel, rel_col=rel)

    cpu = jax.jit(f).lower(q, rel).as_text()
    assert "sasa_local_attention_forward" in cpu and "tpu_custom_call" not in cpu
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for platform, marker in (("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")):
        text = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=triton)(
            q, rel
        ).mlir_module()
        assert marker in text and "sasa_local_attention_" not in text, platform


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
