r"""Evaluates a run's checkpoint again, optionally with other eval settings.

  python -m sasa_jax.evaluate --workdir=DIR [--step=N] [--set=eval_crop_fraction=0.96] [--json]

Restores the latest (or ``--step``'s) checkpoint of a run made by ``train.py`` and evaluates it
on the whole eval split as the trainer does (the EMA weights when the run kept them; the same
compiled eval step and metrics), so with no ``--set`` it repeats the run's own eval at that
step. ``--set FIELD=VALUE`` (repeatable) changes one of the eval fields (``EVAL_FIELDS``), e.g.
the centre crop's fraction, to see how the trained model meets test images prepared another
way. Single-process.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax import cli, data, tasks
from sasa_jax.train import workdir as run_record
from sasa_jax.train.loop import compiled_eval_step, evaluate
from sasa_jax.train.restore import restored_states

# The fields that change how a run is evaluated and nothing it learned.
EVAL_FIELDS = ("eval_crop_fraction", "eval_batch_size", "eval_split", "data_dir", "num_threads")


def with_eval_settings(
    config: ml_collections.ConfigDict, settings: list[str]
) -> ml_collections.ConfigDict:
    """``config`` with each ``FIELD=VALUE`` of ``settings`` applied (a copy; the value parsed
    as the field's type). Raises ValueError for a malformed setting or a field outside
    ``EVAL_FIELDS``."""
    config = ml_collections.ConfigDict(config.to_dict())
    for setting in settings:
        field, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"--set takes FIELD=VALUE, got {setting!r}")
        if field not in EVAL_FIELDS:
            raise ValueError(
                f"--set cannot change {field!r}: only the eval fields {', '.join(EVAL_FIELDS)}"
                " (the rest would not match what the checkpoint learned)"
            )
        kind = type(config[field])
        try:
            config[field] = kind(value)
        except ValueError as error:
            raise ValueError(f"--set {field}: {value!r} is not a {kind.__name__}") from error
    if config.eval_batch_size <= 0:
        raise ValueError(f"eval_batch_size must be positive, got {config.eval_batch_size}")
    return config


def evaluate_run(workdir: str, step: int | None = None, settings: list[str] = ()) -> dict:
    """``{"step", "metrics", "settings", "summary"}``: the run's checkpoint at ``step`` (None:
    the latest) evaluated on its whole eval split with ``settings`` applied
    (``with_eval_settings``); ``summary`` is the trainer's one-line description.

    Raises FileNotFoundError if ``workdir`` holds no run or no checkpoint, ValueError for a
    step that is not kept or a bad setting; both before anything compiles.
    """
    config = with_eval_settings(run_record.load_config(workdir), list(settings))
    chosen = "latest" if step is None else [step]
    ((step, _, eval_graph, state),) = restored_states(config, workdir, chosen)
    splits = data.load_dataset_from_config(config)
    task = tasks.make_task(config, splits.num_classes)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    eval_fn = compiled_eval_step(config, eval_graph, task, mesh, batch_sharding)
    metrics = evaluate(
        state, splits, config, task=task, eval_fn=eval_fn, batch_sharding=batch_sharding
    )
    return {
        "step": step,
        "metrics": metrics,
        "settings": list(settings),
        "summary": task.describe(metrics),
    }


def main() -> None:
    """``python -m sasa_jax.evaluate``; the flags are defined here, not on import."""
    workdir = flags.DEFINE_string("workdir", None, "A training run's workdir.")
    step = flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest).")
    settings = flags.DEFINE_multi_string(
        "set", [], f"FIELD=VALUE for one of the eval fields: {', '.join(EVAL_FIELDS)}."
    )
    as_json = flags.DEFINE_bool("json", False, "End with one JSON object on the last line.")
    flags.mark_flags_as_required(["workdir"])

    def run(argv) -> None:
        cli.no_positional_arguments(argv)
        with cli.user_errors("sasa_jax.evaluate"):
            out = evaluate_run(workdir.value, step.value, settings.value)
        print(f"eval at step {out['step']}: {out['summary']}", flush=True)
        if as_json.value:
            print(json.dumps({"workdir": workdir.value, **out}, default=float))

    app.run(run)


if __name__ == "__main__":
    main()
