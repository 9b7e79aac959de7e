"""The 2-D local self-attention op (no Flax): pure-JAX implementations and a C++ CPU kernel.

``local_attention`` and ``block_attention`` check their arguments and run one module per
implementation, through a primitive lowered per platform (``dispatch``): ``auto`` chooses per
lowering platform. Importing an implementation module registers it. ``stem_attention`` is
the attention stem's attention with its projections in the TPU kernel's tile layout;
``native_stem.stem_attention`` the same inside the C++ CPU kernel.
"""

from sasa_jax.attention import gather, native, pallas, tiled  # noqa: F401  (register them)
from sasa_jax.attention.api import (
    BACKENDS,
    Implementation,
    add_auto_rule,
    attention_implementations,
    auto_choice,
    block_attention,
    from_blocks,
    local_attention,
    register,
    registered,
    softmax_dtype,
    to_blocks,
)
from sasa_jax.attention.stem_tpu import stem_attention
from sasa_jax.attention.windows import BLOCKS, BORDERS, AxisWindow, axis_window, rel_length

__all__ = [
    "BACKENDS",
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
    "registered",
    "rel_length",
    "softmax_dtype",
    "stem_attention",
    "to_blocks",
]
