r"""Parameters and FLOPs of a config's model: ``python -m sasa_jax.summary --config=...``
(the counting is ``sasa_jax.analysis.flops``).

FLOPs are for one image at the config's size, 2 FLOPs per multiply-add (the paper's rule), in
two conventions that differ only in attention layers:

* ``flops`` -- the paper's convention, eq. 3 and eq. 8 as written, which reproduces its tables:
  * Counted: every convolution and dense layer (2 * output pixels * kernel taps * in * out); in
    attention layers the Q/K/V projections, the q.k logits (k*k taps per query), the relative
    logits as a full-width dot product q.r_{a-i,b-j} per window tap (k*k*dim per query and
    head, like q.k), and the weighted sum of the values (k*k taps per query).
  * The attention stem: 4x4 windows at full resolution (224x224); spatially-aware values as M
    separate value projections plus their p-weighted mix (M*out per pixel); the spatial-conv
    values as their 4x4 convolution.
* ``flops_computed`` -- what this code executes: the relative term is factorised, so per query
  and head it costs (len(rel_row) + len(rel_col)) * dim/2 multiply-adds ((kh + kw) * dim/2 for
  borders mask/zeros, (2kh-1 + 2kw-1) * dim/2 for clamp) instead of kh*kw*dim; and the stem
  mixes the M value matrices first (2*16*M*in*out FLOPs), so its values cost one projection.

Both conventions:
  * count window taps outside the image like the others (the compiled op runs them);
  * count a strided attention layer at its input resolution (it attends, then average-pools);
  * do not count batch norm, activations, softmax, pooling, residual additions.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from sasa_jax.analysis.model_summary import summarize_config


def format_summary(result: dict) -> str:
    lines = [f"{'part':<10} {'params':>14} {'GFLOPs':>9} {'computed':>9}  output"]
    for name, stage in result["stages"].items():
        shape = "x".join(str(d) for d in stage["output"])
        lines.append(
            f"{name:<10} {stage['params']:>14,} {stage['flops'] / 1e9:>9.3f} "
            f"{stage['flops_computed'] / 1e9:>9.3f}  {shape}"
        )
    lines.append(
        f"{'total':<10} {result['params']:>14,} {result['flops'] / 1e9:>9.3f} "
        f"{result['flops_computed'] / 1e9:>9.3f}  (at {result['image_size']}x"
        f"{result['image_size']}; GFLOPs in the paper's convention, then as computed)"
    )
    return "\n".join(lines)


def main() -> None:
    """``python -m sasa_jax.summary --config=CONFIG[:ARG] [--json]``. The flags are defined
    here, not on import, so importing this module leaves absl's global flags alone."""
    config = config_flags.DEFINE_config_file("config", None, "Config file[:argument].")
    as_json = flags.DEFINE_bool("json", False, "End with one JSON object on the last line.")

    def run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config.value is None:
            raise app.UsageError("--config is required, e.g. --config=configs/imagenet.py:depth=50")
        result = summarize_config(config.value)
        print(format_summary(result))
        if as_json.value:
            print(json.dumps(result))

    app.run(run)


if __name__ == "__main__":
    main()
