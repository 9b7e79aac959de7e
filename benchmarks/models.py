"""Training-step time and memory: conv ResNets against attention ResNets at 224x224.

One step is the forward and backward pass of softmax cross-entropy in train mode (batch-norm
statistics updated), jitted; no optimizer update. Defaults: batch 8 in float32 on CPU, batch
64 in bfloat16 compute (float32 parameters) on GPU and TPU. Reported per model: median step
time, compiled temp memory (``memory_analysis()``), and ratios to the first model (the
baseline).

    python benchmarks/models.py                              # R50 baseline vs full attention
    python benchmarks/models.py --batch 2 --models 50:baseline 50:full_attention 26:full_attention

With ``--config``, each model is that config's model under an argument string, at its image
size (the stems on the cluttered digits, batch 64 as the config trains):

    python benchmarks/models.py --config configs/digits_clutter.py --batch 64 \
        --models variant=conv_stem_attention variant=full_attention \
        variant=full_attention,stem_window=7
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import roofline
from flax import nnx

from sasa_jax.models import ModelSpec, build_model
from sasa_jax.train import config as config_lib


def step_fn(graphdef):
    """A jitted fwd+bwd over split state: ``(state, images, labels) -> (loss, grads, state)``."""

    def step(state, images, labels):
        model = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        return loss, grads, nnx.state(model)

    return jax.jit(step)


def measure(name: str, spec: ModelSpec, batch: int, size: int, repeats: int, dtype) -> dict:
    model = build_model(spec, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3), dtype)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, spec.num_classes)
    step = step_fn(graphdef)
    compiled = step.lower(state, images, labels).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(state, images, labels))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss, _, _ = jax.block_until_ready(compiled(state, images, labels))
        times.append(time.perf_counter() - start)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss for {name}")
    return {
        "model": name,
        "step_seconds": float(np.median(times)),
        "temp_bytes": int(temp),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _model(name: str, config: str | None, implementation: str) -> tuple[ModelSpec, int]:
    """The spec a --models entry names, and its default image size."""
    if config:
        loaded = config_lib.from_file(config, name)
        spec = ModelSpec.from_config(loaded.model, implementation=implementation)
        return spec, loaded.image_size
    depth, variant = name.split(":")
    return ModelSpec(depth=int(depth), variant=variant, implementation=implementation), 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["50:baseline", "50:full_attention"],
        help="DEPTH:VARIANT, or with --config its argument strings; the first is the "
        "baseline of the ratios",
    )
    parser.add_argument("--config", help="a config file: --models are its arguments")
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--batch", type=int, default=8 if on_cpu else 64)
    parser.add_argument(
        "--dtype", default="float32" if on_cpu else "bfloat16", choices=["float32", "bfloat16"]
    )
    parser.add_argument("--image_size", type=int, help="224, or the config's")
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        spec, size = _model(name, args.config, args.implementation)
        size = args.image_size or size
        row = measure(name, spec, args.batch, size, args.repeats, jnp.dtype(args.dtype))
        row["image_size"] = size
        row["time_ratio"] = row["step_seconds"] / (rows[0] if rows else row)["step_seconds"]
        row["temp_ratio"] = row["temp_bytes"] / (rows[0] if rows else row)["temp_bytes"]
        rows.append(row)
        print(
            f"{name:>30}: {row['step_seconds']:7.3f} s/step "
            f"({row['time_ratio']:4.1f}x), temp {row['temp_bytes'] / 2**30:6.2f} GiB "
            f"({row['temp_ratio']:4.1f}x), peak RSS so far "
            f"{row['peak_rss_bytes'] / 2**30:5.2f} GiB",
            flush=True,
        )
    if args.json:
        print(
            json.dumps(
                {
                    **roofline.run_header(args.batch, args.dtype),
                    "config": args.config,
                    "implementation": args.implementation,
                    "rows": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
