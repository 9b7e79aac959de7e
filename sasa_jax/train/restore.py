"""A finished or running run read back: its train states (``restored_states``) and its model
with the latest weights (``load_run``), for the tools that look at runs (``diagnose``,
``visualize``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import ml_collections
from flax import nnx

from sasa_jax import tasks
from sasa_jax.train import workdir as run_record
from sasa_jax.train.checkpoints import Checkpointer
from sasa_jax.train.steps import TrainState, create_optimizer, create_train_state


def restored_states(
    config: ml_collections.ConfigDict,
    workdir: str,
    steps: Sequence[int] | Literal["all", "latest"] = "all",
    init: bool = False,
) -> Iterator[tuple[int, nnx.GraphDef, nnx.GraphDef, TrainState]]:
    """``(step, graphdef, eval_graphdef, state)`` of a run made by ``train.py``: its initial
    train state when ``init`` (step 0), then each checkpoint in ``steps`` (a list of steps,
    ``"all"`` kept ones or the ``"latest"``).

    Raises FileNotFoundError for ``"latest"`` when there is no checkpoint yet, and ValueError
    for a listed step that is not kept.
    """
    model = tasks.make_task(config, config.model.num_classes).create_model(config.seed)
    graphdef, eval_graph, state = create_train_state(model, create_optimizer(config), config)
    if init:
        yield 0, graphdef, eval_graph, state
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        kept = sorted(checkpointer.all_steps())
        if steps == "latest" and not kept:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        chosen = kept if steps == "all" else kept[-1:] if steps == "latest" else list(steps)
        for step in chosen:
            if step not in kept:
                raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {kept}")
            yield step, graphdef, eval_graph, checkpointer.restore_state(step, state)
    finally:
        checkpointer.close()


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, nnx.Module, int]:
    """``(config, model in eval mode with the latest checkpoint's weights, step)`` of a run
    made by ``train.py``; the EMA weights when the run kept them, as eval does.

    Raises FileNotFoundError if ``workdir`` holds no run or no checkpoint yet.
    """
    config = run_record.load_config(workdir)
    ((step, _, eval_graph, state),) = restored_states(config, workdir, "latest")
    return config, nnx.merge(eval_graph, state.eval_params(), state.batch_stats), step


__all__ = ["load_run", "restored_states"]
