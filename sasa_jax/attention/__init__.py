"""The 2-D local self-attention op (pure JAX, no Flax).

``local_attention`` checks its arguments and dispatches to one module per implementation.
Importing an implementation module registers it.
"""

from sasa_jax.attention import gather  # noqa: F401  (registers "gather")
from sasa_jax.attention.api import (
    Implementation,
    attention_implementations,
    local_attention,
    register,
    softmax_dtype,
)
from sasa_jax.attention.windows import BORDERS, AxisWindow, axis_window, rel_length

__all__ = [
    "BORDERS",
    "AxisWindow",
    "Implementation",
    "attention_implementations",
    "axis_window",
    "local_attention",
    "register",
    "rel_length",
    "softmax_dtype",
]
