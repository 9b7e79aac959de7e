"""Lowering for accelerators from this CPU host: ``jax.export`` for CUDA and TPU runs the
Triton and Mosaic lowering of the Pallas kernels without a device. Each export must carry its
platform's kernel and no CPU custom call."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import pytest

import sasa_jax
from sasa_jax import tasks
from sasa_jax.train import config as config_lib
from sasa_jax.train import steps as train_steps

# The markers of each platform's Pallas kernel in the exported module, and of the CPU kernel.
KERNEL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
CPU_KERNEL = "sasa_local_attention_"
TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _export(fn, platform, *args) -> str:
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=TRITON)
    return exported(*args).mlir_module()


def _check(text: str, platform: str, attention: bool = True) -> None:
    assert (KERNEL[platform] in text) == attention, platform
    assert CPU_KERNEL not in text


def _op_grad(q, k, v, rel_row, rel_col):
    def loss(q, k, v, rel_row, rel_col):
        out = sasa_jax.local_attention(
            q, k, v, window=7, rel_row=rel_row, rel_col=rel_col, implementation="pallas"
        )
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, rel_row, rel_col)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("size, width", [(56, 64), (28, 128), (14, 256), (7, 512)])
def test_op_forward_and_backward_export(platform, dtype, size, width):
    """The ResNet-50 stage shapes, k=7, 8 heads, relative tables, batch 2, by the kernel's name
    (``auto`` takes it on every TPU shape, on a GPU only at 7x7)."""
    head = width // 8
    x = jax.ShapeDtypeStruct((2, size, size, 8, head), jnp.dtype(dtype))
    table = jax.ShapeDtypeStruct((7, head // 2), jnp.dtype(dtype))
    _check(_export(_op_grad, platform, x, x, x, table, table), platform)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_block_attention_exports(platform):
    """The attention stem's op: 4x4 blocks of a 224x224 map, 4 heads of 16, with gradients."""
    x = jax.ShapeDtypeStruct((2, 224, 224, 4, 16), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((7, 8), jnp.bfloat16)

    def grad(q, k, v, rel_row, rel_col):
        def loss(*args):
            out = sasa_jax.block_attention(*args[:3], block=4, rel_row=args[3], rel_col=args[4])
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, rel_row, rel_col)

    _check(_export(grad, platform, x, x, x, table, table), platform)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["baseline", "conv_stem_attention", "full_attention"])
def test_train_step_of_the_table_1_variants_exports(variant):
    """The trainer's own step (bf16 compute, float32 parameters), ResNet-26 at 64x64, batch 2,
    for CUDA and TPU, under ``auto`` (on CUDA the kernel runs the 4x4 and 2x2 stages and the
    stem's blocks)."""
    config = config_lib.apply_model_arg(config_lib.default_config(), f"depth=26,variant={variant}")
    config.half_precision = True
    task = tasks.ClassificationTask(config, 1000)
    tx = train_steps.create_optimizer(config)
    graphdef, _, state = train_steps.abstract_train_state(task, tx, config)
    step = functools.partial(
        train_steps.train_step, graphdef=graphdef, tx=tx, config=config, task=task
    )
    batch = {
        "image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    rate = jax.ShapeDtypeStruct((), jnp.float32)
    for platform in ("cuda", "tpu"):
        text = _export(step, platform, state, batch, rate)
        _check(text, platform, attention=variant != "baseline")


def _context(*devices):
    """A lowering context whose device assignment is ``devices``."""
    axis_context = types.SimpleNamespace(device_assignment=list(devices))
    return types.SimpleNamespace(module_context=types.SimpleNamespace(axis_context=axis_context))


def test_gpu_lowerings_name_their_target_gpu():
    """Pallas's Triton lowering reads the GPU's compute capability from the abstract mesh's
    device from JAX 0.11 on: a CUDA lowering on this GPU-less host names the device compiled
    for, else an H100; the CPU's (what ``jax.export`` assigns) is not a GPU to name. Other
    platforms, and a context that names a device already, are left alone."""
    from sasa_jax.attention import dispatch

    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    cases = [
        ("cuda", _context(), "NVIDIA H100"),
        ("cuda", _context(jax.devices("cpu")[0]), "NVIDIA H100"),
        ("cuda", _context(h100), "NVIDIA H100 80GB HBM3"),
        ("rocm", _context(), "NVIDIA H100"),
    ]
    for platform, ctx, kind in cases:
        with dispatch._gpu_target(platform, ctx):
            device = jax.sharding.get_abstract_mesh().abstract_device
            assert (device.device_kind, device.platform) == (kind, "gpu"), platform
            with dispatch._gpu_target(platform, _context(h100)):  # named already: kept
                assert jax.sharding.get_abstract_mesh().abstract_device.device_kind == kind
    for platform in ("cpu", "tpu"):
        with dispatch._gpu_target(platform, _context()):
            assert jax.sharding.get_abstract_mesh().abstract_device is None
    assert jax.sharding.get_abstract_mesh().abstract_device is None
