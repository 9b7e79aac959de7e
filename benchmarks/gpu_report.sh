#!/usr/bin/env bash
# The whole accelerator report in one call (about 5-8 minutes on one H100/H200): the SASA layer
# against the 3x3 convolution at every ResNet-50 stage and the attention stem (pallas, and the
# pure-JAX "tiled" for comparison), then the three Table 1 ResNet-50 variants' training steps,
# all at batch 64 in bfloat16. Writes OUT/attention.json and OUT/models.json (the --json last
# lines) and the full logs next to them.
#
#   pip install -e . "jax[cuda12]" && benchmarks/gpu_report.sh /tmp/report
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/sasa_gpu_report}"
mkdir -p "$out"
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/device.txt"
python benchmarks/attention.py --batch 64 --dtype bfloat16 --repeats 20 --stem \
  --implementations pallas tiled --json | tee "$out/attention.log"
tail -n 1 "$out/attention.log" > "$out/attention.json"
python benchmarks/models.py --batch 64 --dtype bfloat16 --repeats 10 \
  --models 50:baseline 50:conv_stem_attention 50:full_attention --json | tee "$out/models.log"
tail -n 1 "$out/models.log" > "$out/models.json"
