"""Batch norm: the settings a model shares (``Norm``), and a batch norm for data parallelism whose
cross-device statistics add up in device order (``BatchNorm``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax import parallel

Array = jax.Array


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (features last) whose cross-device statistics add up in device order.

    With ``axis_name`` set and inside ``jax.shard_map`` over that axis, train-mode statistics
    are the mean over every device's shard, taken by ``parallel.ordered_mean_grad`` instead of
    ``lax.pmean``: the same numbers whichever processes hold the devices. Without
    ``axis_name`` (or in eval mode) it is ``nnx.BatchNorm`` itself.
    """

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or self.axis_name is None:
            return super().__call__(x, use_running_average=use_running_average, mask=mask)
        if mask is not None or self.axis not in (-1, x.ndim - 1):
            raise ValueError("the ordered batch norm takes features last and no mask")
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = x.astype(stats_dtype)
        axes = tuple(range(x.ndim - 1))
        mean, var = batch_statistics(self, jnp.stack([xs.mean(axes), (xs * xs).mean(axes)]))
        return normalise(self, x, mean, var, mean.shape)


def uses_running_average(norm: nnx.BatchNorm) -> bool:
    """Whether ``norm`` normalises with its running averages (eval mode)."""
    if norm.use_running_average is None:
        raise ValueError("set the batch norm's mode first: model.train() or model.eval()")
    return bool(norm.use_running_average)


def batch_statistics(norm: nnx.BatchNorm, local: Array) -> tuple[Array, Array]:
    """A train-mode batch's ``(mean, var)`` ``[C]`` from this device's per-feature mean and
    mean square ``local`` ``[2, C]`` (float32), as ``norm``'s own call takes them: over
    ``norm.axis_name``'s devices in device order when set (``BatchNorm`` inside
    ``jax.shard_map``), the variance ``E[x^2] - E[x]^2`` clipped at zero; ``norm``'s running
    averages are updated."""
    if norm.axis_name is not None:
        if not isinstance(norm, BatchNorm):
            raise ValueError(f"{type(norm).__name__} is not sasa_jax.norm.BatchNorm")
        local = parallel.ordered_mean_grad(local, norm.axis_name)
    mean, mean_sq = local[0], local[1]
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    m = norm.momentum
    # set_value, not ``norm.mean[...] =``: under a trace, flax's indexed assignment
    # asks the tracer for its sharding, whose error message walks the whole trace so far
    # (quadratic in the model's size: a third of the train step's tracing time).
    norm.mean.set_value(jax.lax.stop_gradient(m * norm.mean[...] + (1 - m) * mean))
    norm.var.set_value(jax.lax.stop_gradient(m * norm.var[...] + (1 - m) * var))
    return mean, var


def normalise(norm: nnx.BatchNorm, x: Array, mean: Array, var: Array, shape) -> Array:
    """``norm``'s affine normalisation of ``x`` with these statistics, each per-feature vector
    reshaped to ``shape`` (broadcasting against ``x``), in float32; the result in
    ``norm.dtype``, or without one in the type of ``x``, scale and bias together (flax's
    rule)."""
    params = [p[...] for p in (norm.scale, norm.bias) if p is not None]
    f32 = jnp.promote_types(norm.dtype or x.dtype, jnp.float32)
    mul = jax.lax.rsqrt(var.astype(f32) + norm.epsilon)
    if norm.scale is not None:
        mul = mul * norm.scale[...].astype(f32)
    y = (x.astype(f32) - mean.astype(f32).reshape(shape)) * mul.reshape(shape)
    if norm.bias is not None:
        y = y + norm.bias[...].astype(f32).reshape(shape)
    return y.astype(norm.dtype or jnp.result_type(x, *params))


def set_batch_axis(model: nnx.Module, axis_name: str | None) -> None:
    """Makes every batch norm of ``model`` average its train statistics over ``axis_name``
    in device order (see ``BatchNorm``); ``None`` restores per-call statistics."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            if not isinstance(module, BatchNorm):
                raise ValueError(f"{type(module).__name__} is not sasa_jax.norm.BatchNorm")
            module.axis_name = axis_name


@dataclasses.dataclass(frozen=True)
class Norm:
    """Batch-norm settings shared by every norm of a model; ``layer`` is the batch-norm class
    (any ``nnx.BatchNorm`` subclass)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    layer: type[nnx.BatchNorm] = nnx.BatchNorm

    def __call__(self, features: int, *, rngs: nnx.Rngs, zero_scale: bool = False):
        init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
        return self.layer(
            features,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=init,
            rngs=rngs,
        )


__all__ = [
    "BatchNorm",
    "Norm",
    "batch_statistics",
    "normalise",
    "set_batch_axis",
    "uses_running_average",
]
