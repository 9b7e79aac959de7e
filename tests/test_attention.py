"""local_attention: every implementation against the independent dense reference."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_attention, reference_block_attention

import sasa_jax
from sasa_jax import local_attention

IMPLEMENTATIONS = sasa_jax.attention_implementations()


def _inputs(seed, image, window, border, rel, batch=2, heads=2, dim=4, dim_v=3):
    kq, kk, kv, kr, kc = jax.random.split(jax.random.key(seed), 5)
    h, w = image
    kh, kw = (window, window) if isinstance(window, int) else window
    q = jax.random.normal(kq, (batch, h, w, heads, dim))
    k = jax.random.normal(kk, (batch, h, w, heads, dim))
    v = jax.random.normal(kv, (batch, h, w, heads, dim_v))
    tables = {}
    if rel:
        lr, lc = (2 * kh - 1, 2 * kw - 1) if border == "clamp" else (kh, kw)
        tables = {
            "rel_row": jax.random.normal(kr, (lr, dim // 2)),
            "rel_col": jax.random.normal(kc, (lc, dim // 2)),
        }
    return q, k, v, tables


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
CASES = [
    (border, image, window, dilation, rel)
    for (image, window, dilation), border, rel in itertools.product(
        GEOMETRIES, ("mask", "zeros", "clamp"), (True, False)
    )
    if border != "clamp" or (dilation == 1 and np.all(np.array(window) <= np.array(image)))
]


def _case_id(case):
    border, image, window, dilation, rel = case
    tables = "rel" if rel else "norel"
    return f"{border}-img{image[0]}x{image[1]}-win{window}-dil{dilation}-{tables}"


# The reference's results for a case, computed once and shared by every implementation's test.
@functools.cache
def _reference_outputs(case):
    border, image, window, dilation, rel = case
    q, k, v, tables = _inputs(0, image, window, border, rel)
    static = dict(window=window, dilation=dilation, border=border)
    return jax.jit(lambda q, k, v, tables: reference_attention(q, k, v, **tables, **static))(
        q, k, v, tables
    )


@functools.cache
def _reference_gradients(case):
    border, image, window, dilation, rel = case
    q, k, v, tables = _inputs(1, image, window, border, rel)
    cotangent = jax.random.normal(jax.random.key(2), v.shape)
    static = dict(window=window, dilation=dilation, border=border)

    def loss(q, k, v, tables):
        return jnp.sum(reference_attention(q, k, v, **tables, **static)[0] * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, tables)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(implementation, case):
    border, image, window, dilation, rel = case
    q, k, v, tables = _inputs(0, image, window, border, rel)
    static = dict(window=window, dilation=dilation, border=border)

    def ours(q, k, v, tables):
        return local_attention(
            q, k, v, implementation=implementation, return_weights=True, **tables, **static
        )

    out, weights = jax.jit(ours)(q, k, v, tables)
    ref_out, ref_weights = _reference_outputs(case)
    chex.assert_shape(out, v.shape)
    chex.assert_shape(weights, q.shape[:4] + (ref_weights.shape[-1],))
    chex.assert_trees_all_close(out, ref_out, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(weights, ref_weights, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES[::3], ids=_case_id)
def test_gradients_match_reference(implementation, case):
    border, image, window, dilation, rel = case
    q, k, v, tables = _inputs(1, image, window, border, rel)
    cotangent = jax.random.normal(jax.random.key(2), v.shape)
    static = dict(window=window, dilation=dilation, border=border)

    def loss(q, k, v, tables):
        out = local_attention(q, k, v, implementation=implementation, **tables, **static)
        return jnp.sum(out * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, tables)
    chex.assert_trees_all_close(grads, _reference_gradients(case), atol=1e-3, rtol=1e-3)


# (heads, dim, dim_v): the layer's head widths (8 heads of 8, 16, 32, 64), a head count that
# is not a multiple of 8, and unequal dim and dim_v.
HEAD_SHAPES = [(8, 8, 8), (8, 16, 16), (10, 8, 8), (3, 32, 32), (1, 64, 64), (5, 6, 10)]


_HEAD_STATIC = dict(window=5, border="mask")


@functools.cache
def _head_case(heads, dim, dim_v):
    """Inputs, a cotangent, and the reference's output and gradients (computed once)."""
    q, k, v, tables = _inputs(4, (5, 9), 5, "mask", True, heads=heads, dim=dim, dim_v=dim_v)
    cotangent = jax.random.normal(jax.random.key(6), v.shape)

    def loss(q, k, v, tables):
        out = reference_attention(q, k, v, **tables, **_HEAD_STATIC)[0]
        return jnp.sum(out * cotangent), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, out), grads = step(q, k, v, tables)
    return (q, k, v, tables, cotangent), (out, grads)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("heads, dim, dim_v", HEAD_SHAPES, ids=lambda x: str(x))
def test_head_shapes_match_reference(implementation, heads, dim, dim_v):
    """Outputs and gradients for head counts and widths beyond the small cases above."""
    (q, k, v, tables, cotangent), (ref_out, ref_grads) = _head_case(heads, dim, dim_v)

    def loss(q, k, v, tables):
        out = local_attention(q, k, v, implementation=implementation, **tables, **_HEAD_STATIC)
        return jnp.sum(out * cotangent), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, out), grads = step(q, k, v, tables)
    chex.assert_trees_all_close(out, ref_out, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("border", ["mask", "zeros", "clamp"])
def test_bfloat16_runs_and_stays_close(implementation, border):
    q, k, v, tables = _inputs(3, (8, 8), 5, border, True, dim=8, dim_v=8)
    inputs = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    kwargs = dict(window=5, border=border, **{n: t.astype(jnp.bfloat16) for n, t in tables.items()})
    out, weights = local_attention(
        *inputs, implementation=implementation, return_weights=True, **kwargs
    )
    assert out.dtype == jnp.bfloat16
    assert weights.dtype == jnp.float32
    ref_out, ref_weights = reference_attention(*inputs, **kwargs)
    np.testing.assert_allclose(np.float32(out), ref_out, atol=5e-2, rtol=5e-2)
    np.testing.assert_allclose(weights, ref_weights, atol=2e-2)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("border", ["mask", "clamp"])
def test_large_negative_logits_keep_masked_keys_out(implementation, border):
    """Every in-window logit near -1e6: a mask that were only a large finite penalty (say
    -1e4) would let the masked keys win the softmax. Checked against the reference's -inf."""
    q, k, v, tables = _inputs(5, (6, 7), 3, border, rel=True)
    q, k = 30.0 * jnp.abs(q) + 30.0, -30.0 * jnp.abs(k) - 30.0  # q·k in about [-1e6, -1e3]
    out, weights = local_attention(
        q,
        k,
        v,
        window=3,
        border=border,
        implementation=implementation,
        return_weights=True,
        **tables,
    )
    ref_out, ref_weights = reference_attention(q, k, v, window=3, border=border, **tables)
    # Loose: float32 logits of 1e5-1e6 differ by ~0.01 between summation orders, which moves
    # a near tie's weights by up to ~1e-3; a masked key that won would move them by ~1.
    np.testing.assert_allclose(weights, ref_weights, atol=1e-2)
    np.testing.assert_allclose(out, ref_out, atol=1e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_border_semantics_by_hand(implementation):
    """A 1x3 image, window 3, q = 0 (uniform logits): the averages each border implies."""
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1, 1)
    q = jnp.zeros((1, 1, 3, 1, 2))
    avg = {}
    for border in ("mask", "zeros"):
        avg[border] = local_attention(
            q, q, v, window=(1, 3), border=border, implementation=implementation
        )[0, 0, :, 0, 0]
    avg["clamp"] = local_attention(
        q, q, v, window=(1, 3), border="clamp", implementation=implementation
    )[0, 0, :, 0, 0]
    np.testing.assert_allclose(avg["mask"], [5.5, 37.0, 55.0], rtol=1e-6)
    np.testing.assert_allclose(avg["zeros"], [11 / 3, 37.0, 110 / 3], rtol=1e-6)
    np.testing.assert_allclose(avg["clamp"], [37.0, 37.0, 37.0], rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_even_window_reaches_one_more_before(implementation):
    """Window 2 on a 1x3 image: query j sees columns j-1 and j (contract: kh//2 before)."""
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1, 1)
    q = jnp.zeros((1, 1, 3, 1, 2))
    out = local_attention(q, q, v, window=(1, 2), border="mask", implementation=implementation)
    np.testing.assert_allclose(out[0, 0, :, 0, 0], [1.0, 5.5, 55.0], rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_relative_logits_pick_the_right_offset(implementation):
    """A single large row embedding at offset +1 makes every query copy the pixel below it."""
    h, w = 4, 3
    v = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1, 1)
    q = jnp.ones((1, h, w, 1, 2))
    rel_row = jnp.array([[0.0], [0.0], [50.0]])  # offsets -1, 0, +1
    rel_col = jnp.array([[0.0], [30.0], [0.0]])  # prefer offset 0
    out = local_attention(
        q,
        jnp.zeros_like(q),
        v,
        window=3,
        rel_row=rel_row,
        rel_col=rel_col,
        border="mask",
        implementation=implementation,
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
        assert {"auto", "dense", "fused", "gather", "native", "tiled"} <= set(
            sasa_jax.attention_implementations(backend)
        )
    # The C++ kernel is for XLA's CPU backend only.
    assert "native" not in sasa_jax.attention_implementations("gpu")


CHUNKING = {
    # (implementation, module, {constant: value}): force each way an implementation splits
    # a batch (for tiled and dense: into loop steps of whole images, of rows of tiles, or of
    # some heads of one row), and "tiled" into many small, overhanging tiles.
    "fused-unrolled": ("fused", "fused", {"CHUNK_ELEMENTS": 1, "MAX_UNROLLED_CHUNKS": 16}),
    "fused-loop": ("fused", "fused", {"CHUNK_ELEMENTS": 1, "MAX_UNROLLED_CHUNKS": 1}),
    # A budget of 1 logit: one image, one row of tiles and one head per step.
    "dense-loop": ("dense", "tiled", {"CHUNK_ELEMENTS": 1}),
    "tiled-2x2-loop": ("tiled", "tiled", {"CHUNK_ELEMENTS": 1, "TILE": 2}),
    # 4 rows of 2x2 tiles (the last overhangs the map), room for 3 per step: 2 per step.
    "tiled-2x2-two-rows": ("tiled", "tiled", {"CHUNK_ELEMENTS": 3 * 384, "TILE": 2}),
}


@pytest.mark.parametrize("setting", sorted(CHUNKING))
@pytest.mark.parametrize("border", ["mask", "clamp"])
def test_batch_chunks_match_reference(setting, border, monkeypatch):
    """Chunked batches give the reference's outputs, weights and gradients: through the
    output alone (an implementation's own backward pass, where it has one) and through the
    output and the returned weights."""
    implementation, module_name, constants = CHUNKING[setting]
    module = getattr(sasa_jax.attention, module_name)
    for name, value in constants.items():
        monkeypatch.setattr(module, name, value)
    q, k, v, tables = _inputs(3, (7, 6), 3, border, rel=True, batch=3)
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
    from sasa_jax.attention import axis_window, tiled

    rows, cols = axis_window(7, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", 3 * 384)
    p = tiled.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (1, 2, 4, 6)
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", 3 * 4 * 384)
    p = tiled.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (3, 4, 4, 1)


def test_steps_split_heads_when_a_row_of_tiles_does_not_fit(monkeypatch):
    """A row of 2x2 tiles of a 5x6 map holds 3 tiles x 4 queries x 16 halo keys = 192 logits
    per head: with 6 heads and room for 400 logits, a step takes 2 heads of one row."""
    from sasa_jax.attention import axis_window, tiled

    rows, cols = axis_window(5, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", 400)
    p = tiled.plan(rows, cols, 2, batch=3, heads=6)
    assert (p.images, p.tile_rows, p.heads, p.head_steps, p.steps) == (1, 1, 2, 3, 27)
    # The steps visit every (image, row of tiles, group of heads) once.
    origins = {tuple(int(i) for i in p.origin(jnp.asarray(s))) for s in range(p.steps)}
    assert origins == {(i, r, h) for i in range(3) for r in range(3) for h in (0, 2, 4)}


def test_auto_picks_by_map_size_and_takes_new_rules(monkeypatch):
    from sasa_jax.attention import add_auto_rule, auto_choice, axis_window
    from sasa_jax.attention.api import _REGISTRY

    def windows(size, window=7):
        return axis_window(size, window, 1, "mask"), axis_window(size, window, 1, "mask")

    # CPU: the C++ kernel wherever it is built (it is, on this project's machines).
    for size, dim in ((7, 64), (14, 32), (28, 16), (56, 8)):
        assert auto_choice((8, size, size, 8, dim), *windows(size), backend="cpu") == "native"
    # Without it: dense on small maps, tiled on large ones.
    native = _REGISTRY["native"]
    monkeypatch.setitem(
        _REGISTRY, "native", dataclasses.replace(native, available=lambda backend: False)
    )
    assert auto_choice((8, 7, 7, 8, 64), *windows(7), backend="cpu") == "dense"
    assert auto_choice((8, 14, 14, 8, 32), *windows(14), backend="cpu") == "dense"
    assert auto_choice((8, 28, 28, 8, 16), *windows(28), backend="cpu") == "tiled"
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="cpu") == "tiled"
    # GPU: dense only where the map fits in one window (measured on an H100); never native.
    assert auto_choice((8, 7, 7, 8, 64), *windows(7), backend="gpu") == "dense"
    assert auto_choice((8, 14, 14, 8, 32), *windows(14), backend="gpu") == "tiled"
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="gpu") == "fused"
    # A later kernel registers a rule for its backend; unregistered names are skipped.
    add_auto_rule("test-backend", "no-such-kernel", lambda *_: True)
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="test-backend") == "tiled"
    add_auto_rule("test-backend", "gather", lambda shape, rows, cols: rows.size == 56)
    assert auto_choice((8, 56, 56, 8, 8), *windows(56), backend="test-backend") == "gather"
    assert auto_choice((8, 28, 28, 8, 16), *windows(28), backend="test-backend") == "tiled"


# ------------------------------------------------------------------------ block attention

# (image, block, heads, dim): square and rectangular maps, block 1 (each query alone) and a
# block as large as the map.
BLOCK_CASES = [((8, 12), 4, 2, 8), ((6, 6), 3, 3, 4), ((4, 6), 1, 2, 4), ((4, 4), 4, 1, 6)]


def _block_inputs(image, heads, dim, block, rel, batch=2):
    ks = jax.random.split(jax.random.key(7), 6)
    shape = (batch, *image, heads, dim)
    q, k, v = (jax.random.normal(ks[i], shape) for i in range(3))
    tables = {}
    if rel:
        tables = {
            name: jax.random.normal(ks[3 + i], (2 * block - 1, dim // 2))
            for i, name in enumerate(("rel_row", "rel_col"))
        }
    return q, k, v, tables, jax.random.normal(ks[5], shape)


# Every implementation but the kernel runs block_attention through the same cut-out tiles and
# its own "clamp" path (tested above for every geometry). "fused" unrolls a clamp window per
# offset and takes about 35 s to compile at block 4, so it runs the smaller blocks only.
BLOCK_RUNS = [
    (implementation, case)
    for implementation in IMPLEMENTATIONS
    for case in BLOCK_CASES
    if implementation != "fused" or case[1] < 4
]


@pytest.mark.parametrize("rel", [True, False], ids=["rel", "norel"])
@pytest.mark.parametrize(
    "implementation, case",
    BLOCK_RUNS,
    ids=lambda c: c if isinstance(c, str) else f"img{c[0][0]}x{c[0][1]}-b{c[1]}",
)
def test_block_attention_matches_reference(implementation, case, rel):
    """Outputs, weights and gradients of every implementation (the C++ kernel on the whole
    map, the others on cut-out tiles) against the dense per-tile reference."""
    image, block, heads, dim = case
    q, k, v, tables, cot = _block_inputs(image, heads, dim, block, rel)
    rel_row, rel_col = tables.get("rel_row"), tables.get("rel_col")
    ref_out, ref_weights = reference_block_attention(q, k, v, rel_row, rel_col, block)

    def ours(q, k, v, tables, weights=False):
        return sasa_jax.block_attention(
            q, k, v, block=block, implementation=implementation, return_weights=weights, **tables
        )

    out = jax.jit(ours)(q, k, v, tables)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    out_w, weights = jax.jit(functools.partial(ours, weights=True))(q, k, v, tables)
    chex.assert_trees_all_close(out_w, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(weights, ref_weights, atol=1e-5, rtol=1e-5)

    def loss(attend, q, k, v, tables):
        return jnp.sum(attend(q, k, v, tables) * cot)

    def reference(q, k, v, tables):
        return reference_block_attention(
            q, k, v, tables.get("rel_row"), tables.get("rel_col"), block
        )[0]

    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)))(q, k, v, tables)
    ref_grads = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2, 3))(q, k, v, tables)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("native" not in IMPLEMENTATIONS, reason="the C++ kernel is not built")
@pytest.mark.parametrize("implementation", ["native", "auto"])
def test_block_attention_runs_the_kernel_on_the_whole_map(implementation):
    """On CPU the kernel takes the blocks' window tables on the uncut map: its custom call
    sees [batch, height, width, ...], and no tiles are cut out (no transposes)."""
    q, k, v, tables, _ = _block_inputs((8, 12), 2, 8, 4, True)

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
