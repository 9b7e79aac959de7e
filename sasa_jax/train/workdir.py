"""What a training workdir holds about its run, and whether a new command may resume it.

``train.py`` writes ``WORKDIR/config.json`` (the run's config, with the dataset's class count)
next to its checkpoints. Running a command on a workdir that holds a run resumes it only when
the command's config is the same run: fields that only say how long to train, how often to log,
evaluate or checkpoint, or how fast to read the data may change (one line says what changed);
any other difference is refused, before anything is built or compiled, with one error that
names the fields.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"

# Fields a resumed run may change. Everything else must match the run in the workdir.
RESUMABLE = frozenset(
    {
        "num_train_steps",
        "num_epochs",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "eval_batch_size",
        "num_workers",
        "num_threads",
        "prefetch_batches",
        "data_dir",
        "model.implementation",
    }
)
# Filled in from the dataset, not from the command.
_DERIVED = frozenset({"model.num_classes"})


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json stores it (tuples become lists)."""
    return json.loads(config.copy_and_resolve_references().to_json())


def check_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    """The workdir as a path; ValueError if it exists and is not a directory."""
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {path} is a file; give a directory (new or holding a run)")
    return path


def differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """``{field: (in the workdir, in the command)}`` for every field that differs."""
    old, new = _flat(saved), _flat(_plain(config))
    fields = (set(old) | set(new)) - _DERIVED
    missing = "(not set)"
    return {
        f: (old.get(f, missing), new.get(f, missing))
        for f in sorted(fields)
        if old.get(f, missing) != new.get(f, missing)
    }


def resume_changes(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[str]:
    """Checks that ``config`` may run in ``workdir``; returns a line per allowed change.

    Raises:
      ValueError: the workdir is a file, holds checkpoints without a config record, or holds a
        run whose config differs in a field outside ``RESUMABLE``; the message lists them.
    """
    path = check_workdir(workdir)
    record = path / CONFIG_FILE
    if not record.is_file():
        if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
            raise ValueError(
                f"{path} holds checkpoints but no {CONFIG_FILE}, so it cannot be checked "
                "against this config; use a new --workdir"
            )
        return []
    diff = differences(json.loads(record.read_text()), config)
    refused = {f: d for f, d in diff.items() if f not in RESUMABLE}
    if refused:
        listed = "; ".join(f"{f}: {old!r} there, {new!r} here" for f, (old, new) in refused.items())
        raise ValueError(
            f"{path} holds a run of another config ({listed}). Use a new --workdir for this "
            "config, or run the workdir's own config to resume it."
        )
    return [f"resuming with {f} changed from {old!r} to {new!r}" for f, (old, new) in diff.items()]


def save_config(config, workdir: str | pathlib.Path, *, num_classes: int) -> None:
    """Writes ``workdir/config.json``: the run's config with the dataset's class count, so a
    run can be checked on resume and rebuilt later (``sasa_jax.visualize``)."""
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.model.num_classes = num_classes
    path = pathlib.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(resolved.to_json(indent=2))


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with; FileNotFoundError without one."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} holds no run of train.py (no {CONFIG_FILE})")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
