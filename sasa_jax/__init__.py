"""sasa-jax: Stand-Alone Self-Attention in Vision Models, in JAX and Flax NNX."""

from sasa_jax.attention import attention_implementations, block_attention, local_attention

__version__ = "0.1.0"

__all__ = ["__version__", "attention_implementations", "block_attention", "local_attention"]
