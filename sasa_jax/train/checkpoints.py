"""Orbax checkpoints of the train state together with each process's data-iterator position."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class _IteratorState:
    """Adapts ``prefetch_to_mesh`` to Grain's Orbax handler (which writes one JSON file per
    process: ``process_<i>-of-<n>.json``)."""

    def __init__(self, batches):
        self._batches = batches

    def get_state(self) -> bytes:
        return json.dumps(self._batches.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._batches.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Saves ``(state, data position)`` under ``workdir/checkpoints/<step>``, keeps the last
    ``keep``, and restores the latest."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the kept checkpoints."""
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, batches) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorState(batches)),
            ),
            force=True,
        )

    def restore_latest(self, state: Any, batches) -> tuple[Any, int]:
        """``(restored state, step)``, or ``(state, 0)`` when there is no checkpoint. The
        restored arrays keep ``state``'s shardings; ``batches`` is moved to the saved position."""
        step = self._manager.latest_step()
        if step is None:
            return state, 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(_IteratorState(batches)),
            ),
        )
        return restored.state, step

    def restore_state(self, step: int, state: Any) -> Any:
        """The train state alone of checkpoint ``step`` (no data iterator), like ``state``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored.state

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
