#!/usr/bin/env bash
# The whole accelerator report in one call (233 s on an H200, 2026-12-04), in three steps,
# each under a time limit of its own so that a failing or slow step leaves the others their
# time:
#   1. tests: the "pallas" kernel's cases of tests/test_attention*.py, on the GPU: the Triton
#      kernel, forward and gradients, against the float64 NumPy reference (up to 120 s);
#   2. attention: the SASA layer against the 3x3 convolution at every ResNet-50 stage and the
#      attention stem ("pallas", and the pure-JAX "tiled" for comparison; up to 190 s);
#   3. models: the three Table 1 ResNet-50 variants' training steps (up to 240 s);
# 2 and 3 at batch 64 in bfloat16. Writes OUT/device.txt, OUT/{tests,attention,models}.log and
# OUT/{attention,models}.json (the --json last lines).
#
#   pip install -e ".[test]" "jax[cuda12]" && benchmarks/gpu_report.sh /tmp/report
#
# Without an install, on a machine whose `python` already has JAX for its GPU, flax (>= 0.12.8),
# optax, chex, ml_collections and pytest-xdist: the checkout is put on PYTHONPATH. Each step's
# log keeps what it printed before a failure or its time limit; the script's exit status is 1
# if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/sasa_gpu_report}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit status $rc" | tee -a "$out/$name.log"
  [ "$rc" -eq 0 ] || failed=1
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$out/device.txt"

# The test workers share the one GPU: none may take three quarters of its memory up front.
XLA_PYTHON_CLIENT_PREALLOCATE=false step tests 120 python -m pytest \
  tests/test_attention.py tests/test_attention_api.py -k "pallas and not pallas_tpu" \
  -o addopts="" -p no:cacheprovider -q -n 8 -rf
step attention 190 python benchmarks/attention.py --batch 64 --dtype bfloat16 --repeats 20 \
  --stem --implementations pallas tiled --json
grep '^{' "$out/attention.log" | tail -n 1 > "$out/attention.json"
step models 240 python benchmarks/models.py --batch 64 --dtype bfloat16 --repeats 10 \
  --models 50:baseline 50:conv_stem_attention 50:full_attention --json
grep '^{' "$out/models.log" | tail -n 1 > "$out/models.json"
exit "$failed"
