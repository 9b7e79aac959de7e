r"""Compiles a config's train and eval steps for a TPU or GPU topology from any host.

  python -m sasa_jax.aot --config=configs/imagenet.py:depth=26,variant=full_attention \
      --topology=v5e:2x2 --per_device_batch=8 [--config.FIELD=VALUE ...] [--json]

No accelerator is needed: the steps are compiled by XLA for the target's compile-only devices
(``sasa_jax.analysis``) -- the same program ``train.py`` would run there, Pallas kernels
included. It prints, per device: arguments, outputs, temporaries and the peak of each step,
the chip's memory and whether the steps fit, the compile time, and FLOPs and bytes accessed
where the backend reports them (TPU). ``--max_batch`` also searches the largest per-device batch
whose train step fits (a compile per try). ``--json`` ends with one JSON object, the largest
step's memory under ``memory`` (``peak_bytes`` per device).

The compilers come from extras: ``pip install -e ".[tpu]"`` (libtpu) for TPU topologies,
``pip install -e ".[cuda12-aot]"`` (the CUDA plugin) for GPUs. An unknown topology, a missing
plugin, a bad config or steps that do not fit print one line and exit with status 2.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from sasa_jax import cli
from sasa_jax.analysis import targets
from sasa_jax.analysis.compile_report import GB, StepReport, compile_steps

MAX_TRIED_BATCH = 4096


def _line(report: StepReport) -> str:
    cost = ""
    if report.flops:
        cost = f"; {report.flops / 1e12:.2f} TFLOPs, {report.bytes_accessed / GB:.2f} GB accessed"
    return (
        f"  {report.step}: peak {report.peak / GB:.3f} GB = arguments {report.arguments / GB:.3f}"
        f" + outputs {report.outputs / GB:.3f} - aliased {report.aliased / GB:.3f} + temp "
        f"{report.temp / GB:.3f} + code {report.code / GB:.3f}; {report.kernels} attention "
        f"kernel calls; compiled in {report.compile_seconds:.1f} s{cost}"
    )


def _fits(reports: list[StepReport], memory: int) -> bool:
    return all(r.peak <= memory for r in reports)


def largest_batch(config, devices: list, memory: int, start: int) -> int:
    """The largest per-device batch whose train step fits in ``memory`` bytes (0 if none):
    doubling from ``start``, then halving the gap."""

    def fits(batch: int) -> bool:
        return _fits(compile_steps(config, devices, batch, steps=("train",)), memory)

    low, high = 0, None
    batch = max(1, start)
    while high is None and batch <= MAX_TRIED_BATCH:
        if fits(batch):
            low, batch = batch, batch * 2
        else:
            high = batch
    if high is None:
        return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def run(config, topology: str, per_device_batch: int, max_batch: bool) -> dict:
    """Compiles and reports; the result is the JSON object ``--json`` prints."""
    target = targets.parse_topology(topology)
    devices = targets.devices(target)
    memory = targets.device_memory(target, len(devices))
    reports = compile_steps(config, devices, per_device_batch)
    largest = max(reports, key=lambda r: r.peak)
    result = {
        "topology": target.name,
        "platform": target.platform,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "per_device_batch": per_device_batch,
        "device_memory_bytes": memory,
        "half_precision": bool(config.half_precision),
        "image_size": config.image_size,
        "steps": [r.as_dict() for r in reports],
        "memory": largest.as_dict()["memory"],
        "fits": _fits(reports, memory),
    }
    if max_batch:
        result["max_per_device_batch"] = largest_batch(config, devices, memory, per_device_batch)
    return result


def describe(result: dict) -> str:
    device = result["device_memory_bytes"] / GB
    lines = [
        f"{result['topology']}: {result['devices']} x {result['device_kind']} ({device:.1f} GB "
        f"each), {result['per_device_batch']} images of {result['image_size']}x"
        f"{result['image_size']} per device, {'bf16' if result['half_precision'] else 'f32'} "
        "compute; per device:"
    ]
    for step in result["steps"]:
        memory = step["memory"]
        report = StepReport(
            step["step"],
            memory["arguments_bytes"],
            memory["outputs_bytes"],
            memory["aliased_bytes"],
            memory["temp_bytes"],
            memory["code_bytes"],
            step["compile_seconds"],
            step["flops"],
            step["bytes_accessed"],
            step["kernels"],
        )
        lines.append(_line(report))
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(
        f"  peak {result['memory']['peak_bytes'] / GB:.3f} GB of {device:.1f} GB: {verdict}"
    )
    if "max_per_device_batch" in result:
        lines.append(f"  largest per-device batch that fits: {result['max_per_device_batch']}")
    return "\n".join(lines)


def main() -> None:
    """``python -m sasa_jax.aot``; the flags are defined here, not on import."""
    config = config_flags.DEFINE_config_file("config", None, "Config file[:argument].")
    topology = flags.DEFINE_string("topology", None, targets.TOPOLOGY_HELP)
    batch = flags.DEFINE_integer("per_device_batch", 8, "Images per chip.")
    max_batch = flags.DEFINE_bool("max_batch", False, "Also find the largest batch that fits.")
    as_json = flags.DEFINE_bool("json", False, "End with one JSON object on the last line.")
    flags.mark_flags_as_required(["config", "topology"])

    def _main(argv):
        cli.no_positional_arguments(argv)
        jax.config.update("jax_platforms", "cpu")  # no accelerator here: compile-only devices
        with cli.user_errors("sasa_jax.aot"):
            result = run(config.value, topology.value, batch.value, max_batch.value)
        print(describe(result), flush=True)
        if as_json.value:
            print(json.dumps(result), flush=True)
        if not result["fits"]:
            cli.fail(
                "sasa_jax.aot",
                f"the steps need {result['memory']['peak_bytes'] / GB:.2f} "
                f"GB per device, more than the {result['device_memory_bytes'] / GB:.1f} GB of a "
                f"{result['device_kind']}; lower --per_device_batch "
                "(--max_batch finds the largest that fits)",
            )

    app.run(_main)


if __name__ == "__main__":
    main()
