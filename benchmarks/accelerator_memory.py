"""Per-device memory of the Table 1 models' train steps on TPU and GPU targets, compiled here
without the devices (``sasa_jax.aot``'s path; run in a venv with ``.[tpu,cuda12-aot]``).

    python benchmarks/accelerator_memory.py --topologies=v5e:2x2,h100:4 --depths=26,50 \\
        --batches=8,32 --image_size=224 --json
    python benchmarks/accelerator_memory.py --topologies=v5e:2x2 --variants=full_attention \
        --model=stem_remat=True --json    # model fields added to every variant's argument

For each (topology, depth, variant, per-device batch): the train step's peak bytes per device
(``memory.peak_bytes``), whether it fits, and the compile time. ``largest_fit`` is a linear
estimate from the two smallest batches (peak = fixed + batch * per image), capped at the
device's memory: an estimate, not a compile (``python -m sasa_jax.aot ... --max_batch``
searches by compiling).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax

from sasa_jax.analysis import targets
from sasa_jax.analysis.compile_report import compile_steps
from sasa_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "conv_stem_attention", "full_attention")


def measure(
    topology: str, depth: int, variant: str, batch: int, image_size: int, model: str = ""
) -> dict:
    argument = ",".join(filter(None, [f"depth={depth},variant={variant}", model]))
    config = config_lib.from_file(ROOT / "configs/imagenet.py", argument)
    config.image_size = image_size
    target = targets.parse_topology(topology)
    devices = targets.devices(target)
    (report,) = compile_steps(config, devices, batch, steps=("train",))
    memory = targets.device_memory(target, len(devices))
    return {
        "topology": topology,
        "depth": depth,
        "variant": variant,
        "model": model,
        "per_device_batch": batch,
        "image_size": image_size,
        "peak_bytes": report.peak,
        "device_memory_bytes": memory,
        "fits": report.peak <= memory,
        "compile_s": round(report.compile_seconds, 1),
    }


def largest_fit(rows: list[dict]) -> int | None:
    """A linear estimate of the largest per-device batch that fits, from two measured ones."""
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: r["per_device_batch"])
    if len(fitting) < 2:
        return None
    a, b = fitting[0], fitting[1]
    per_image = (b["peak_bytes"] - a["peak_bytes"]) / (
        b["per_device_batch"] - a["per_device_batch"]
    )
    fixed = a["peak_bytes"] - per_image * a["per_device_batch"]
    return int((a["device_memory_bytes"] - fixed) // per_image) if per_image > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="v5e:2x2,h100:4")
    parser.add_argument("--depths", default="26")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument(
        "--model",
        default="",
        help="more model fields for the config's argument, e.g. stem_remat=True",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    rows, estimates = [], []
    for topology in args.topologies.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            for variant in args.variants.split(","):
                group = []
                for batch in (int(b) for b in args.batches.split(",")):
                    row = measure(topology, depth, variant, batch, args.image_size, args.model)
                    group.append(row)
                    print(
                        f"{topology} R{depth} {variant}{',' + args.model if args.model else ''} "
                        f"b{batch}: peak "
                        f"{row['peak_bytes'] / 1e9:.3f} GB"
                        f"{'' if row['fits'] else ' (does not fit)'}, compiled in "
                        f"{row['compile_s']} s",
                        flush=True,
                    )
                rows += group
                estimates.append(
                    {"topology": topology, "depth": depth, "variant": variant,
                     "largest_fit_estimate": largest_fit(group)}
                )  # fmt: skip
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows, "largest": estimates}))


if __name__ == "__main__":
    main()
