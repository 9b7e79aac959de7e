"""local_attention's contract by hand (borders, even windows, offsets), its errors, and how the
implementations are listed, chunked, tiled and chosen."""

from __future__ import annotations

import dataclasses
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import (
    random_inputs,
    reference_attention,
)

import sasa_jax
from sasa_jax import local_attention

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


# The C++ kernel is offered on the CPU of a CPU host (where it builds: on this project's
# machines); a GPU or TPU host's CPU platform runs pure JAX.
CPU_HOST = jax.default_backend() == "cpu"


def test_implementations_listed():
    for backend in (None, "cpu"):
        names = set(sasa_jax.attention_implementations(backend))
        assert {"auto", "dense", "gather", "tiled"} <= names
        assert ("native" in names) == CPU_HOST, backend
    # The C++ kernel is for XLA's CPU backend only; the Pallas kernels for GPU and TPU (on CPU
    # they run in interpret mode when asked for by name).
    for backend in ("gpu", "tpu"):
        names = sasa_jax.attention_implementations(backend)
        assert "pallas" in names and "native" not in names
    assert "pallas" not in sasa_jax.attention_implementations("cpu")


@pytest.mark.parametrize("implementation", ["gather", "dense", "tiled"])
@pytest.mark.parametrize("weights", [False, True])
def test_pure_jax_matmuls_are_exact_in_float32_only(implementation, weights):
    """Every matmul of the pure-JAX passes (output, weights, all gradients), as lowered, asks
    for HIGHEST precision on float32 inputs, where a GPU's default is TF32 and a TPU's bf16
    (on an H200 that put the gathered weights 3e-3 off the kernel's), and for the backend's
    default on bfloat16 ones. The Pallas kernels choose per matmul; CPU ignores the setting,
    so this checks the request."""
    q, k, v, tables = random_inputs(0, (6, 7), window=3, border="mask", rel="rel")

    def loss(q, k, v, rel_row, rel_col):
        out = local_attention(
            q, k, v, window=3, rel_row=rel_row, rel_col=rel_col,
            implementation=implementation, return_weights=weights,
        )  # fmt: skip
        return sum(x.astype(jnp.float32).sum() for x in jax.tree.leaves(out))

    for dtype, asked in ((jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")):
        args = [x.astype(dtype) for x in (q, k, v, tables["rel_row"], tables["rel_col"])]
        text = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) >= 8  # the forward's and the five gradients' matmuls
        assert all(f"precision = [{asked}, {asked}]" in line for line in dots), dots


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
    q, k, v, tables = random_inputs(3, (7, 6), 3, border, "rel", batch=3)
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


def _step_budget(monkeypatch, logits: int) -> None:
    """The tiled loop's logits per step, on a CPU host or an accelerator's."""
    from sasa_jax.attention import tiles

    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", logits)
    monkeypatch.setattr(tiles, "ACCELERATOR_CHUNK_ELEMENTS", logits)


def test_tiled_steps_take_rows_of_tiles_that_divide_the_image(monkeypatch):
    """The step sizing behind "tiled-2x2-two-rows": a 7x6 map has 4 rows of 2x2 tiles of
    3 tiles x 4 queries x 16 halo keys x 2 heads = 384 logits each. Room for 3 rows: steps
    of 2 (a divisor of 4, so no row of tiles is padded); for 3 images: whole images."""
    from sasa_jax.attention import axis_window, tiles

    rows, cols = axis_window(7, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    _step_budget(monkeypatch, 3 * 384)
    p = tiles.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (1, 2, 4, 6)
    _step_budget(monkeypatch, 3 * 4 * 384)
    p = tiles.plan(rows, cols, 2, batch=3, heads=2)
    assert (p.images, p.tile_rows, p.q_rows.tiles, p.steps) == (3, 4, 4, 1)


def test_steps_split_heads_when_a_row_of_tiles_does_not_fit(monkeypatch):
    """A row of 2x2 tiles of a 5x6 map holds 3 tiles x 4 queries x 16 halo keys = 192 logits
    per head: with 6 heads and room for 400 logits, a step takes 2 heads of one row."""
    from sasa_jax.attention import axis_window, tiles

    rows, cols = axis_window(5, 3, 1, "mask"), axis_window(6, 3, 1, "mask")
    _step_budget(monkeypatch, 400)
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
    # Without the kernels: dense on small maps, tiled on large ones (on GPU dense only where
    # the map fits in one window, as measured on an H100).
    expected = {"cpu": ["dense", "dense", "tiled", "tiled"], "gpu": ["dense"] + ["tiled"] * 3}
    # CPU: the C++ kernel on a CPU host; TPU: the Pallas kernel; GPU: the Pallas kernel where
    # the map fits in one window, tiled on larger maps (as measured on an H200).
    for (size, dim), without in zip(stages, expected["cpu"], strict=True):
        shape = (8, size, size, 8, dim)
        cpu = auto_choice(shape, *windows(size), backend="cpu")
        assert cpu == ("native" if CPU_HOST else without), size
        assert auto_choice(shape, *windows(size), backend="tpu") == "pallas"
        gpu = auto_choice(shape, *windows(size), backend="gpu")
        assert gpu == ("pallas" if size == 7 else "tiled"), size
    # A GPU before Ampere cannot run Pallas's Triton kernels: "auto" passes them over there.
    for capability, name in (("7.5", "dense"), ("7.0", "dense"), ("8.0", "pallas")):
        gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability)
        assert auto_choice((8, 7, 7, 8, 64), *windows(7), "gpu", gpu) == name, capability
    for name in ("native", "pallas"):
        impl = dataclasses.replace(_REGISTRY[name], available=lambda backend: False)
        monkeypatch.setitem(_REGISTRY, name, impl)
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
    """One traced function: lowered for CPU it runs the C++ kernel (on a CPU host), exported
    for TPU or CUDA the Pallas kernel (Mosaic, Triton) and nothing of the CPU's. A 7x7 map in
    a 7x7 window: on GPU the Triton kernel runs only where the map fits in one window."""
    q = jax.ShapeDtypeStruct((2, 7, 7, 8, 8), jnp.float32)
    rel = jax.ShapeDtypeStruct((7, 4), jnp.float32)

    def f(q, rel):
        return local_attention(q, q, q, window=7, rel_row=rel, rel_col=rel)

    cpu = jax.jit(f).trace(q, rel).lower(lowering_platforms=("cpu",)).as_text()
    assert ("sasa_local_attention_forward" in cpu) == CPU_HOST
    assert "tpu_custom_call" not in cpu and "triton" not in cpu
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for platform, marker in (("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")):
        text = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=triton)(
            q, rel
        ).mlir_module()
        assert marker in text and "sasa_local_attention_" not in text, platform
