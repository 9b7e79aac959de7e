"""The attention stem alone (or the conv stem), forward and backward in train mode, compiled
for a TPU or GPU target without the device (a venv with ``.[tpu,cuda12-aot]``): its temporary
memory and, on TPU, the bytes XLA's cost analysis counts.

    python benchmarks/stem_memory.py --topologies=v5e:1x1,h100:1 --batch=32 --json
    python benchmarks/stem_memory.py --topologies=v5e:1x1 --stem=conv --json

The stem of ``models.AttentionStem`` (4x4 blocks, spatially-aware values, 3 -> 64 channels, batch
norm, ReLU, 4x4 max pool) or ``models.ConvStem`` on ``[batch, size, size, 3]`` bfloat16 images,
one device of the topology; the loss is the sum of the squared outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_jax.analysis import targets
from sasa_jax.models import AttentionStem, ConvStem
from sasa_jax.nn import Norm


def measure(topology: str, stem_kind: str, batch: int, size: int) -> dict:
    device = targets.devices(targets.parse_topology(topology))[0]
    norm = Norm(dtype=jnp.bfloat16)
    rngs = nnx.Rngs(0)
    if stem_kind == "attention":
        stem = AttentionStem(3, 64, norm=norm, rngs=rngs, dtype=jnp.bfloat16)
    else:
        stem = ConvStem(3, 64, norm=norm, rngs=rngs)
    graphdef, state = nnx.split(stem)

    def grads(state, images):
        def loss(state):
            out = nnx.merge(graphdef, state)(images)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss)(state)

    where = jax.sharding.SingleDeviceSharding(device)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.bfloat16, sharding=where)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), state)
    compiled = jax.jit(grads).lower(specs, images).compile()
    cost = compiled.cost_analysis() if device.platform == "tpu" else None
    return {
        "topology": topology,
        "stem": stem_kind,
        "batch": batch,
        "image_size": size,
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "bytes_accessed": (cost or {}).get("bytes accessed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="v5e:1x1,h100:1")
    parser.add_argument("--stem", choices=("attention", "conv"), default="attention")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    rows = []
    for topology in args.topologies.split(","):
        row = measure(topology, args.stem, args.batch, args.image_size)
        rows.append(row)
        accessed = row["bytes_accessed"]
        temp = row["temp_bytes"] / 1e9
        line = f"{topology} {args.stem} stem, batch {args.batch}: temp {temp:.3f}"
        print(line + (f" GB, {accessed / 1e9:.1f} GB accessed" if accessed else " GB"), flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}))


if __name__ == "__main__":
    main()
