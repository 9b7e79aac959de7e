r"""Per-layer statistics of a run's attention layers, from its checkpoints.

  python -m sasa_jax.diagnose --workdir=DIR [--init] [--steps=400,890] [--images=32]
      [--moved=stem] [--shift_images=512] [--json]

For each kept checkpoint (and with ``--init``, the model the run started from), on the first
``--images`` training images (augmented as in training, seed 0): each attention layer's input
and output scale, how peaked its weights are, which logit term decides them, its relative
tables' scale, the stem's mixture use, and ``|grad| / |weights|`` per layer and per part of the
model (``sasa_jax.analysis.diagnostics`` says what each column is); how many directions the
stem's output spans (its effective rank, train-mode batch norm); and for each parameter
whose path starts with ``--moved`` (default ``stem``), how far it has moved from its initial
value, ``|W - W_0| / |W_0|``. With ``--shift_images=N``, on the first N test images moved
by 1-3 pixels and by the stem's stride: how far the stem's output moves and how much of that
no local linear map explains, and how often the classifier's answer, and its top-1, stays
the same over the stride x stride phases (``sasa_jax.analysis.shifts``). Run it on a conv
model's workdir too to compare the parts.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from sasa_jax import cli, data, tasks
from sasa_jax.analysis import diagnostics, shifts
from sasa_jax.train import workdir as run_record
from sasa_jax.train.restore import restored_states

COLUMNS = ("in_rms", "out_rms", "entropy", "top", "qk_std", "qr_std", "rel_rms", "grad_ratio")


def _batch(task, config, count: int) -> dict:
    """The first ``count`` training examples, augmented as in training (seed 0)."""
    records = data.load_dataset_from_config(config).train
    augment = task.augment()
    rng = np.random.default_rng(0)
    return _stacked([augment.example(records[i], rng) for i in range(min(count, len(records)))])


def _stacked(examples: list[dict]) -> dict:
    """Examples stacked into one batch along a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *examples)


def _test_batch(task, config, count: int) -> dict:
    """The first ``count`` test (eval split) examples, prepared as for evaluation."""
    records = data.load_dataset_from_config(config).eval
    example = task.eval_example()
    return _stacked([example(i, records[i]) for i in range(min(count, len(records)))])


def _shift_row(model, test: dict | None, inputs) -> dict:
    """``shifts.stem_shift_change`` on the normalised test images ``inputs``, and for a
    classifier ``shifts.phase_consistency``; empty without test images."""
    if test is None:
        return {}
    row = shifts.stem_shift_change(model, inputs) or {}
    return row | (shifts.phase_consistency(model, inputs, test.get("label")) or {})


def diagnose(
    workdir: str, steps=None, init=False, images=32, moved="stem", shift_images=0
) -> list[dict]:
    """One row per (checkpoint, attention layer), per (checkpoint, model part), per
    (checkpoint, parameter under ``moved``), and with ``shift_images`` one per checkpoint for
    the shift measurements on that many test images."""
    if shift_images < 0:
        raise ValueError(f"--shift_images must be 0 (none) or more, not {shift_images}")
    config = run_record.load_config(workdir)
    task = tasks.make_task(config, config.model.num_classes)
    batch = _batch(task, config, images)
    inputs = task.inputs(batch)
    test = _test_batch(task, config, shift_images) if shift_images else None
    test_inputs = task.inputs(test) if test is not None else None
    rows = []
    states = restored_states(config, workdir, steps or "all", init=True)
    initial = None
    for step, graphdef, _, state in states:
        if initial is None:  # restored_states yields the run's initial state first
            initial = state.params
            if not init:
                continue
        else:
            movement = diagnostics.parameter_movement(initial, state.params, moved)
            rows += [{"step": step, "param": p, "moved": m} for p, m in movement.items()]
        model = nnx.merge(graphdef, state.params, state.batch_stats)
        # first: too few --shift_images is an error before anything compiles
        if shift := _shift_row(model, test, test_inputs):
            rows.append({"step": step, "shift_images": len(test["image"]), **shift})
        ratios = diagnostics.gradient_ratios(task, model, batch)
        rank = diagnostics.stem_rank(model, inputs)
        if rank is not None:
            rows.append({"step": step, **rank})
        model.eval()
        stats = diagnostics.attention_stats(model, inputs)
        rows += [{"step": step, **row} for row in diagnostics.as_rows(stats, ratios)]
        rows += [
            {"step": step, "part": name, "grad_ratio": ratio}
            for name, ratio in ratios.items()
            if name not in stats
        ]
    return rows


def _format(rows: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3g}"

    lines = []
    for step in sorted({r["step"] for r in rows}):
        lines.append(f"step {step}:")
        lines.append(f"  {'layer':<34}" + "".join(f"{c:>11}" for c in COLUMNS))
        for r in (r for r in rows if r["step"] == step and "layer" in r):
            lines.append(f"  {r['layer']:<34}" + "".join(f"{cell(r.get(c)):>11}" for c in COLUMNS))
            if r.get("mix_entropy") is not None:
                lines.append(f"  {'  stem mixture entropy':<34}{cell(r['mix_entropy']):>11}")
        parts = [r for r in rows if r["step"] == step and "part" in r]
        lines.append(
            "  |grad|/|w| per part: "
            + ", ".join(f"{r['part']} {cell(r['grad_ratio'])}" for r in parts)
        )
        for r in (r for r in rows if r["step"] == step and "stem_rank" in r):
            lines.append(
                f"  stem output: effective rank {r['stem_rank']:.3g} of {r['stem_channels']} "
                f"channels; {r['stem_components']} components hold 99% of its variance"
            )
        for r in (r for r in rows if r["step"] == step and "shift_images" in r):
            lines.append(_format_shift(r))
        params = [r for r in rows if r["step"] == step and "param" in r]
        if params:
            lines.append(
                "  |W - W0|/|W0|: " + ", ".join(f"{r['param']} {cell(r['moved'])}" for r in params)
            )
    return "\n".join(lines)


def _format_shift(r: dict) -> str:
    pixels = [k.rsplit("_", 1)[1] for k in r if k.startswith("stem_shift_") and k[-1].isdigit()]
    line = f"  on {r['shift_images']} test images moved by less than the stem's stride:"
    if pixels:
        line += "\n    the stem's output moves " + ", ".join(
            f"{r[f'stem_shift_{p}']:.3g} at {p} px ({r[f'stem_shift_{p}_unexplained']:.3g} "
            "unexplained)"
            for p in pixels
        )
        line += f"; {r['stem_shift_cell']:.3g} at one stride, moved back one cell"
    if "consistency" in r:
        line += (
            f"\n    the answer stays the unmoved one's at {100 * r['consistency']:.1f}% of "
            f"moved phases; one answer at every phase for {100 * r['all_phases']:.1f}% of images"
        )
    if "phase_top1_min" in r:
        line += (
            f"; top-1 {100 * r['phase_top1_min']:.1f}% at the worst phase, "
            f"{100 * r['phase_top1_max']:.1f}% at the best"
        )
    return line


def main() -> None:
    """``python -m sasa_jax.diagnose``; the flags are defined here, not on import."""
    workdir = flags.DEFINE_string("workdir", None, "A training run's workdir.")
    steps = flags.DEFINE_list("steps", None, "Checkpoint steps (default: every kept one).")
    init = flags.DEFINE_bool("init", False, "Also the model the run started from (step 0).")
    images = flags.DEFINE_integer("images", 32, "Training images the statistics are taken on.")
    moved = flags.DEFINE_string(
        "moved", "stem", "How far the parameters under this path moved from init ('' for all)."
    )
    shift_images = flags.DEFINE_integer(
        "shift_images", 0, "Test images to move by less than the stem's stride (0: none)."
    )
    as_json = flags.DEFINE_bool("json", False, "End with one JSON object on the last line.")
    flags.mark_flags_as_required(["workdir"])

    def run(argv) -> None:
        cli.no_positional_arguments(argv)
        with cli.user_errors("sasa_jax.diagnose"):
            chosen = [int(s) for s in steps.value] if steps.value else None
            rows = diagnose(
                workdir.value, chosen, init.value, images.value, moved.value, shift_images.value
            )
        print(_format(rows))
        if as_json.value:
            print(json.dumps({"workdir": workdir.value, "rows": rows}))

    app.run(run)


if __name__ == "__main__":
    main()
