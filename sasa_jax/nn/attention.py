"""Flax NNX layers: the SASA layer (a drop-in for a 3x3 conv), and the projections and checks
it shares with the attention stem's attention (``nn.stem_attention``). No normalisation,
training or parallelism here: the stem's batch norm, ReLU and pooling are
``models.AttentionStem``.

Initialisation (the paper does not say; these are our choices):
  * Q/K/V (and the stem's mixture of value matrices) are bias-free 1x1 projections with LeCun
    normal weights (truncated normal, variance 1/fan_in): unit-variance inputs give
    unit-variance q, k and v components.
  * Relative tables ``rel_row``/``rel_col`` are N(0, 1), the same per-component scale as k, so
    q·k and q·r start out comparable. q is scaled by head_dim^-0.5 before both terms.
  * The stem's mixture embeddings nu_m are N(0, 1) and its position embeddings N(0, 1/(2e))
    for embedding size e, so eq. 9's mixture logits start at unit variance
    (``nn.stem_values.spatial_value_params``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.attention import (
    BORDERS,
    attention_implementations,
    local_attention,
    rel_length,
)

Array = jax.Array

POSITIONAL = ("relative", "absolute", "none")
LOGITS = ("qk+qr", "qr")
STEM_VALUES = ("spatially_aware", "stand_alone", "spatial_conv_values")


def _choice(value: str, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _check_implementation(name: str) -> None:
    available = attention_implementations()
    if name not in available:
        raise ValueError(f"implementation must be one of {available}, got {name!r}")


def sinusoidal_2d(height: int, width: int, features: int, dtype: Any = jnp.float32) -> Array:
    """Fixed 2-D sinusoidal position embedding, ``[height, width, features]``.

    The first half of the channels encodes the row, the second the column; each half is
    ``[sin(p*f_0), ..., sin(p*f_{n-1}), cos(p*f_0), ...]`` with ``f_i = 10000^(-i/n)`` and
    ``n = features // 4``. ``features`` must be a multiple of 4.
    """
    if features % 4:
        raise ValueError(f"a 2-D sinusoidal embedding needs features % 4 == 0, got {features}")
    n = features // 4
    freqs = 10000.0 ** (-jnp.arange(n, dtype=jnp.float32) / n)

    def encode(length):
        angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [length, 2n]

    rows = jnp.broadcast_to(encode(height)[:, None, :], (height, width, 2 * n))
    cols = jnp.broadcast_to(encode(width)[None, :, :], (height, width, 2 * n))
    return jnp.concatenate([rows, cols], axis=-1).astype(dtype)


def relative_logit_maps(q: Array, rel_row: Array, rel_col: Array) -> Array:
    """Each query's relative logits per head over every table offset,
    ``q[:d/2]·rel_row[a] + q[d/2:]·rel_col[c]``: ``[b, h, w, heads, len(rel_row), len(rel_col)]``.
    """
    half = q.shape[-1] // 2
    rows = jnp.einsum("bhwnd,rd->bhwnr", q[..., :half], rel_row.astype(q.dtype))
    cols = jnp.einsum("bhwnd,cd->bhwnc", q[..., half:], rel_col.astype(q.dtype))
    return rows[..., :, None] + cols[..., None, :]


def _projection(in_features, out_features, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def _project(linear: nnx.Linear, x: Array) -> Array:
    """Applies a 1x1 projection as one 2-D matmul: XLA's CPU dot is several times faster on
    ``[pixels, features]`` than on the 4-D ``[b, h, w, features]`` (benchmarks/attention.py)."""
    return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], linear.out_features)


def _split_heads(x: Array, num_heads: int) -> Array:
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class SelfAttention2D(nnx.Module):
    """The SASA layer (eq. 2-3): a drop-in replacement for a 3x3 convolution.

    Maps ``[batch, height, width, in_features]`` to
    ``[batch, height/strides, width/strides, out_features]``. Dense bias-free Q/K/V projections
    (3·in·out weights), multi-head local attention over a ``window`` with relative logits, and
    for ``strides=2`` a 2x2 average pool after the attention, as in the paper.

    Args:
      in_features, out_features: channel counts; out_features must divide into num_heads.
      strides: 1 or 2.
      window: spatial extent k (int or (kh, kw)); 7 in the paper.
      num_heads: 8 in the paper.
      positional: "relative" (learned rel_row/rel_col shared across heads), "absolute" (fixed
        2-D sinusoid added to the keys) or "none".
      logits: "qk+qr" (eq. 3) or "qr" (position only, no W_K; Table 6).
      border, dilation, implementation: passed to ``local_attention``.
      dtype: compute dtype (e.g. jnp.bfloat16); None follows the inputs and parameters.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides: int = 1,
        window: int | tuple[int, int] = 7,
        num_heads: int = 8,
        positional: str = "relative",
        logits: str = "qk+qr",
        border: str = "mask",
        dilation: int = 1,
        implementation: str = "auto",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides!r}")
        if out_features % num_heads:
            raise ValueError(
                f"out_features ({out_features}) must be divisible by num_heads ({num_heads})"
            )
        _choice(positional, "positional", POSITIONAL)
        _choice(logits, "logits", LOGITS)
        _choice(border, "border", BORDERS)
        _check_implementation(implementation)
        if logits == "qr" and positional != "relative":
            raise ValueError("logits='qr' needs positional='relative': it has no other logit")
        head_dim = out_features // num_heads
        if positional == "relative" and head_dim % 2:
            raise ValueError(f"relative logits need an even head dim, got {head_dim}")
        if positional == "absolute" and out_features % 4:
            raise ValueError(f"absolute positions need out_features % 4 == 0, got {out_features}")
        self.window = (window, window) if isinstance(window, int) else tuple(window)
        self.in_features, self.out_features = in_features, out_features
        self.strides, self.num_heads, self.head_dim = strides, num_heads, head_dim
        self.positional, self.logits = positional, logits
        self.border, self.dilation, self.implementation = border, dilation, implementation
        self.dtype = dtype
        # set True to sow the attention weights, relative logits, inputs and outputs
        # (sasa_jax.viz.attention_maps, sasa_jax.analysis.diagnostics)
        self.capture = False
        self.query = _projection(in_features, out_features, dtype, param_dtype, rngs)
        self.key = (
            _projection(in_features, out_features, dtype, param_dtype, rngs)
            if logits == "qk+qr"
            else None
        )
        self.value = _projection(in_features, out_features, dtype, param_dtype, rngs)
        if positional == "relative":
            init = jax.nn.initializers.normal(1.0)
            kh, kw = self.window
            self.rel_row = nnx.Param(
                init(rngs.params(), (rel_length(kh, border), head_dim // 2), param_dtype)
            )
            self.rel_col = nnx.Param(
                init(rngs.params(), (rel_length(kw, border), head_dim // 2), param_dtype)
            )
        else:
            self.rel_row = self.rel_col = None

    def __call__(self, x: Array, *, return_weights: bool = False):
        """``x: [batch, height, width, in_features]``; optionally also the attention weights
        ``[batch, height, width, heads, kh*kw]`` (before any pooling)."""
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected [batch, height, width, {self.in_features}], got {tuple(x.shape)}"
            )
        q = _project(self.query, x)
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        v = _project(self.value, x)
        k = None  # logits "qr": the relative term alone, no q·k work
        if self.key is not None:
            k = _project(self.key, x)
            if self.positional == "absolute":
                k = k + sinusoidal_2d(x.shape[1], x.shape[2], self.out_features, k.dtype)
        rel = {}
        if self.rel_row is not None:
            rel = {
                "rel_row": self.rel_row[...].astype(q.dtype),
                "rel_col": self.rel_col[...].astype(q.dtype),
            }
        q_heads = _split_heads(q, self.num_heads)
        want_weights = return_weights or self.capture
        result = local_attention(
            q_heads,
            None if k is None else _split_heads(k, self.num_heads),
            _split_heads(v, self.num_heads),
            window=self.window,
            dilation=self.dilation,
            border=self.border,
            implementation=self.implementation,
            return_weights=want_weights,
            **rel,
        )
        out, weights = result if want_weights else (result, None)
        if self.capture:
            self.sow(nnx.Intermediate, "attention_weights", weights)
            self.sow(nnx.Intermediate, "inputs", x)
            self.sow(nnx.Intermediate, "outputs", out)
            if rel:
                self.sow(
                    nnx.Intermediate,
                    "relative_logits",
                    relative_logit_maps(q_heads, rel["rel_row"], rel["rel_col"]),
                )
        out = out.reshape(*out.shape[:3], self.out_features)
        if self.strides == 2:
            out = nnx.avg_pool(out, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
        return (out, weights) if return_weights else out
