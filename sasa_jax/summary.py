"""Parameters and FLOPs of a config's model: ``python -m sasa_jax.summary --config=...``.

Prints params and GFLOPs per part for one image at the config's size, in the paper's
convention and as this code computes them; ``sasa_jax.analysis.flops`` defines both
conventions and what each counts.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from sasa_jax import cli
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
        cli.no_positional_arguments(argv)
        if config.value is None:
            raise app.UsageError("--config is required, e.g. --config=configs/imagenet.py:depth=50")
        with cli.user_errors("sasa_jax.summary"):
            result = summarize_config(config.value)
        print(format_summary(result))
        if as_json.value:
            print(json.dumps(result))

    app.run(run)


if __name__ == "__main__":
    main()
