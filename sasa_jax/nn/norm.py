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
        local = jnp.stack([xs.mean(axes), (xs * xs).mean(axes)])
        mean, mean_sq = parallel.ordered_mean_grad(local, self.axis_name)
        var = jnp.maximum(0.0, mean_sq - mean * mean)
        m = self.momentum
        # set_value, not ``self.mean[...] =``: under a trace, flax's indexed assignment
        # asks the tracer for its sharding, whose error message walks the whole trace so far
        # (quadratic in the model's size: a third of the train step's tracing time).
        self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
        self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            mul = mul * self.scale[...].astype(stats_dtype)
        y = (xs - mean) * mul
        if self.bias is not None:
            y = y + self.bias[...].astype(stats_dtype)
        return y.astype(self.dtype or x.dtype)


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


__all__ = ["BatchNorm", "Norm", "set_batch_axis"]
