"""What a model costs without running it: deviceless compiles for TPU and GPU topologies and
their per-device memory (``targets``, ``compile_report``; ``python -m sasa_jax.aot``)."""
