"""Reading models and runs without training them: deviceless compiles for TPU and GPU topologies
and their per-device memory (``targets``, ``compile_report``; ``python -m sasa_jax.aot``), FLOP
and parameter counts (``flops``, ``retinanet_flops``, ``model_summary``), per-layer attention
statistics and shift readings of a run's checkpoints (``diagnostics``, ``shifts``; ``python -m
sasa_jax.diagnose``), sweep results (``sweep_results``, ``paired``), and the block copies a
``pallas_call``'s grid implies (``pallas_grid``)."""
