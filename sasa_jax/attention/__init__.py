"""The 2-D local self-attention op (no Flax): pure-JAX implementations and a C++ CPU kernel.

``local_attention`` checks its arguments and dispatches to one module per implementation.
Importing an implementation module registers it.
"""

from sasa_jax.attention import fused, gather, native, tiled  # noqa: F401  (register them)
from sasa_jax.attention.api import (
    Implementation,
    add_auto_rule,
    attention_implementations,
    auto_choice,
    block_attention,
    from_blocks,
    local_attention,
    register,
    softmax_dtype,
    to_blocks,
)
from sasa_jax.attention.windows import BLOCKS, BORDERS, AxisWindow, axis_window, rel_length

__all__ = [
    "BLOCKS",
    "BORDERS",
    "AxisWindow",
    "Implementation",
    "add_auto_rule",
    "attention_implementations",
    "auto_choice",
    "axis_window",
    "block_attention",
    "from_blocks",
    "local_attention",
    "register",
    "rel_length",
    "softmax_dtype",
    "to_blocks",
]
