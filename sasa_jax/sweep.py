r"""Config-driven ablations: every cell of a grid, for several seeds, as ordinary training runs.

  python -m sasa_jax.sweep --config=configs/digits_clutter.py --workdir=/tmp/sweep_window \
      --grid=model.window=3,5,7,9 --seeds=3 --config.num_epochs=10

Each run is ``python -m sasa_jax.train --config=FILE[:ARG] --workdir=DIR/<cell>/seed<k>
--config.seed=k`` plus the cell's ``--config.FIELD=VALUE`` and any ``--config.FIELD=VALUE`` given
to the sweep, so it resumes, and can be inspected and visualised, like any other run; its exit
status says whether it finished, was stopped by a signal (resumable) or failed. Several
``--grid`` flags make their product; a cell is named by its values (``window=3``,
``window=3,positional=none``).
The same command again skips finished runs (each leaves ``sweep_run.json`` beside its
checkpoints) and resumes unfinished ones, including runs a signal stopped (Ctrl-C stops the
running training processes with a checkpoint). A run that fails is reported in the results and the
others go on. ``--jobs=N`` runs N at once; on a host with several GPUs or TPU chips each job
sees one device (``CUDA_VISIBLE_DEVICES`` / ``TPU_VISIBLE_CHIPS``).

Writes DIR/results.json (one row per run, with the machine it last started on: ``host``, from
the run's ``hosts.jsonl``), DIR/results.md (mean ± standard deviation over
seeds per cell) and DIR/results.png (``sasa_jax.analysis.sweep_results``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import time
from typing import Any

from sasa_jax import cli
from sasa_jax.analysis import sweep_results
from sasa_jax.train import EXIT_STOPPED, host, metrics
from sasa_jax.train import config as config_lib

# Each run is this module, with the installed package: no source checkout needed.
TRAIN = ("-m", "sasa_jax.train")
RECORD = "sweep_run.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: a cell's field values and a seed."""

    cell: str
    fields: dict[str, Any]
    seed: int
    workdir: pathlib.Path
    args: tuple[str, ...]  # python -m sasa_jax.train's arguments


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``"model.window=3,5,7"`` -> ``("model.window", ["3", "5", "7"])``."""
    field, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not field.strip() or not items:
        raise ValueError(f"--grid takes FIELD=V1,V2,..., got {text!r}")
    return field.strip(), items


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--config.num_epochs=2"]`` -> ``[("num_epochs", "2")]``; anything else is an error."""
    out = []
    for arg in args:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"unknown argument {arg!r}; overrides are --config.FIELD=VALUE")
        field, value = arg[len("--config.") :].split("=", 1)
        out.append((field, value))
    return out


def set_field(config, field: str, text: str) -> Any:
    """Sets the dotted ``field`` of ``config`` from ``text``, typed like its current value, and
    returns the value. ValueError for a field the config does not have or a bad value."""
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
        if name not in node or not hasattr(node[name], "keys"):
            raise ValueError(f"the config has no field {field!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"the config has no field {field!r}; it has {sorted(node.keys())}")
    node[leaf] = config_lib.parse_value(text, node[leaf], field)
    return node[leaf]


def cell_name(fields: dict[str, Any]) -> str:
    """A directory name for a cell: ``window=3,positional=none`` (the fields' last parts, or
    the whole dotted names when two last parts would clash)."""
    if not fields:
        return "default"
    leaves = [f.split(".")[-1] for f in fields]
    names = leaves if len(set(leaves)) == len(leaves) else list(fields)
    text = ",".join(f"{n}={v}" for n, v in zip(names, fields.values(), strict=True))
    return text.replace("/", "-").replace(" ", "")


def plan(
    config: str,
    workdir: str | os.PathLike,
    grids: list[str],
    seeds: int,
    overrides: list[str],
) -> list[Run]:
    """Every run of the sweep, in grid order then seed order. Each cell's config is built (with
    the overrides) and checked before anything runs (``loop.check_config``), so a bad
    field or value, or a model that cannot be built, fails at once."""
    from sasa_jax.train import loop  # JAX and the models: only once a sweep is planned

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    path, _, arg = config.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    axes = [parse_grid(g) for g in grids]
    fields = [f for f, _ in axes]
    if len(set(fields)) != len(fields):
        raise ValueError(f"a field is given to --grid twice: {fields}")
    extra = parse_overrides(overrides)
    runs = []
    for values in itertools.product(*(v for _, v in axes)):
        cfg = config_lib.from_file(path, arg or None)
        for field, text in extra:
            set_field(cfg, field, text)
        typed = {f: set_field(cfg, f, v) for f, v in zip(fields, values, strict=True)}
        loop.check_config(cfg)  # starts no JAX backend: the runs need the devices
        cell = cell_name(typed)
        cell_args = [f"--config.{f}={v}" for f, v in zip(fields, values, strict=True)]
        for seed in range(seeds):
            run_dir = pathlib.Path(workdir) / cell / f"seed{seed}"
            args = (
                f"--config={config}",
                f"--workdir={run_dir}",
                *overrides,
                *cell_args,
                f"--config.seed={seed}",
            )
            runs.append(Run(cell, typed, seed, run_dir, args))
    return runs


def _record(run: Run) -> dict | None:
    path = run.workdir / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def is_finished(run: Run) -> bool:
    """True when the run finished with exactly these arguments."""
    record = _record(run)
    return bool(record) and record["status"] == "done" and record["args"] == list(run.args)


def final_eval(workdir: pathlib.Path) -> dict[str, float]:
    """The last eval row of a run's metrics.jsonl (``eval_*`` values), or {}."""
    rows = [r for r in metrics.read_metrics(workdir) if any(k.startswith("eval_") for k in r)]
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if k.startswith("eval_") and k != "eval_examples"}


def _last_line(log: pathlib.Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no output"


def device_env(slot: int) -> dict[str, str]:
    """The environment that gives job ``slot`` one accelerator: a GPU by CUDA_VISIBLE_DEVICES
    when ``nvidia-smi`` lists more than one, else a TPU chip when /dev/accel* shows several."""
    gpus = 0
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        gpus = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    if gpus > 1:
        return {"CUDA_VISIBLE_DEVICES": str(slot % gpus)}
    chips = len(list(pathlib.Path("/dev").glob("accel*")))
    if chips > 1:
        return {
            "TPU_VISIBLE_CHIPS": str(slot % chips),
            "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": str(8476 + slot),
        }
    return {}


def execute(run: Run, env: dict[str, str], train: tuple[str, ...] = TRAIN) -> dict:
    """Runs (or resumes) one run (``python -m sasa_jax.train``); writes and returns its
    record. The exit status says how it ended: 0 done, ``EXIT_STOPPED`` stopped by a signal
    with a checkpoint (the next call resumes it), anything else failed."""

    run.workdir.mkdir(parents=True, exist_ok=True)
    previous = _record(run) or {}
    earlier = previous.get("wall_s", 0.0) if previous.get("args") == list(run.args) else 0.0
    log = run.workdir / "train.log"
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(
            [sys.executable, *train, *run.args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            check=False,
        ).returncode
    status = {0: "done", EXIT_STOPPED: "stopped"}.get(code, "failed")
    error = {"done": "", "stopped": "stopped by a signal; run the sweep again to resume"}
    record = {
        "args": list(run.args),
        "status": status,
        "wall_s": earlier + time.perf_counter() - start,
        "metrics": final_eval(run.workdir) if status == "done" else {},
        "error": error.get(status, f"exit {code}: {_last_line(log)}"),
    }
    (run.workdir / RECORD).write_text(json.dumps(record, indent=1))
    return record


def run_all(runs: list[Run], jobs: int = 1, train: tuple[str, ...] = TRAIN) -> list[dict]:
    """Runs the unfinished runs, ``jobs`` at a time, and returns one result row per run."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    todo = [r for r in runs if not is_finished(r)]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    slots: queue.Queue[int] = queue.Queue()
    envs = {}
    for slot in range(jobs):
        slots.put(slot)
        envs[slot] = device_env(slot) if jobs > 1 else {}

    def one(run: Run) -> None:
        slot = slots.get()
        try:
            record = execute(run, envs[slot], train)
            print(
                f"{run.cell}/seed{run.seed}: {record['status']}"
                f" in {record['wall_s']:.0f} s {record['metrics'] or record['error']}",
                flush=True,
            )
        finally:
            slots.put(slot)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    return [result_row(r) for r in runs]


def result_row(run: Run) -> dict:
    """A run's row of results.json."""
    record = _record(run) or {"status": "not run", "wall_s": None, "metrics": {}, "error": ""}
    return {
        "cell": run.cell,
        "fields": run.fields,
        "seed": run.seed,
        "status": record["status"],
        "metrics": record["metrics"],
        "wall_s": record["wall_s"],
        "error": record["error"],
        "workdir": str(run.workdir),
        "host": host.last_summary(run.workdir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sasa_jax.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="FILE[:ARG], as for sasa_jax.train")
    parser.add_argument("--workdir", required=True, help="the sweep's directory")
    parser.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,...")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    args, overrides = parser.parse_known_args(argv)
    with cli.user_errors("sasa_jax.sweep"):
        runs = plan(args.config, args.workdir, args.grid, args.seeds, overrides)
        rows = run_all(runs, args.jobs, TRAIN)
    paths = sweep_results.write(args.workdir, rows)
    failed = sum(r["status"] != "done" for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} runs done; " + ", ".join(map(str, paths)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
