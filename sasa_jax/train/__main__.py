r"""Trains and evaluates a config: the same command on a laptop CPU, a GPU box or a TPU pod.

  python -m sasa_jax.train --config=configs/digits.py --workdir=/tmp/sasa_digits
  python -m sasa_jax.train --config=configs/imagenet.py:depth=50,variant=full_attention \
      --workdir=DIR

(``python train.py ...`` in a checkout is the same.)
Writes TensorBoard events, metrics.jsonl and Orbax checkpoints to --workdir; running the same
command again resumes. Any config field can be overridden with --config.FIELD=VALUE. A config
or data error (a bad field, a missing dataset, a workdir holding another run) prints one line
and exits with status 2; --traceback shows where it came from. A run stopped by SIGTERM or
SIGINT saves a checkpoint and exits with status 75; the same command resumes it.

Several processes: pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to
each (they go to jax.distributed.initialize). Without them, jax.distributed.initialize() is
called with no arguments when the environment names a multi-host job, and JAX auto-detects the
rest: a Cloud TPU VM pod slice (TPU_WORKER_HOSTNAMES lists more than one host, or
MEGASCALE_COORDINATOR_ADDRESS is set) or a SLURM job with more than one task (SLURM_NTASKS > 1,
launched with srun). Otherwise the run is single-process.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sasa_jax import cli
from sasa_jax.train import EXIT_STOPPED, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:argument].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the traceback of config and data errors instead of one line."
)
flags.mark_flags_as_required(["config", "workdir"])


def _multi_host_environment() -> bool:
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed() -> None:
    """Starts jax.distributed from the flags, or from a detected multi-host environment."""
    given = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id go together"
            )
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _multi_host_environment():
        jax.distributed.initialize()


def size_cpu_thread_pool() -> None:
    """Gives XLA's CPU client the same thread pool in every process layout of one run.

    XLA's CPU dots split their sums by the size of the process's thread pool, which is
    max(PJRT_NPROC or the core count, local devices): 1 process of 4 simulated devices and 2
    processes of 2 would round differently. Unless PJRT_NPROC is set, it is set here, before
    JAX starts, to max(cores, global devices), so that with config.deterministic_reductions any
    split of the devices over processes computes the same bits. A one-device run keeps the core
    count (no change).
    """
    if "PJRT_NPROC" in os.environ:
        return
    found = re.search(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    local = int(found.group(1)) if found else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["PJRT_NPROC"] = str(max(cores or 1, local * (_NUM_PROCESSES.value or 1)))


def main(argv) -> None:
    cli.no_positional_arguments(argv)
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    size_cpu_thread_pool()
    initialize_distributed()
    logging.info(
        "process %d of %d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    with cli.user_errors("sasa_jax.train", traceback=_TRACEBACK.value):
        result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if result["stopped"]:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    app.run(main)
