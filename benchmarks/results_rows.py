"""Re-measures the README's results rows: each row's command from an empty TFDS data dir, its
final eval metric from metrics.jsonl, its wall time (dataset build and compiles included) and
the mean wall time from one eval to the next (an epoch with its eval: ``seconds_per_eval``).

    python benchmarks/results_rows.py                       # every row, seed 0
    python benchmarks/results_rows.py --rows=digits,full_attention --seeds=0,1,2 --json

Runs one command at a time (timings on a shared machine drift: compare rows measured in one
call). Arguments it does not know go to every train.py command, e.g. ``--config.num_epochs=80``.
Each run gets a fresh workdir and TFDS dir under --out (deleted unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from sasa_jax.train import host, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable

# name: (preparation command or None, train.py arguments, the metric that is the row's result)
ROWS = {
    "digits": (None, ["--config=configs/digits.py"], "eval_top1"),
    "patches": (
        [PY, "benchmarks/make_patches.py", "--out", "{tmp}/patches"],
        ["--config=configs/image_folder.py:{tmp}/patches"],
        "eval_top1",
    ),
    "full_attention": (None, ["--config=configs/digits.py:variant=full_attention"], "eval_top1"),
    "clutter": (None, ["--config=configs/digits_clutter.py"], "eval_top1"),
    "clutter_full_attention": (
        None,
        ["--config=configs/digits_clutter.py:variant=full_attention"],
        "eval_top1",
    ),
    "detection": (None, ["--config=configs/digits_detection.py"], "eval_ap"),
    "detection_attention": (
        None,
        ["--config=configs/digits_detection.py:heads=attention"],
        "eval_ap",
    ),
    "shapes_coco": (
        [PY, "benchmarks/make_coco_folder.py", "--out", "{tmp}/shapes_coco"],
        ["--config=configs/coco_folder.py:{tmp}/shapes_coco"],
        "eval_ap",
    ),
}


def _final(workdir: pathlib.Path, metric: str) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if metric in r][-1]


def run_row(name: str, seed: int, out: pathlib.Path, extra: list[str]) -> dict:
    """One row's command for one seed; returns its result, wall seconds and command."""
    prepare, args, metric = ROWS[name]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_s{seed}_", dir=out))
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp / "tfds")}
    start = time.perf_counter()
    if prepare:
        subprocess.run([a.format(tmp=tmp) for a in prepare], cwd=ROOT, check=True, env=env)
    command = [
        PY,
        "train.py",
        *[a.format(tmp=tmp) for a in args],
        f"--workdir={tmp / 'run'}",
        f"--config.seed={seed}",
        *extra,
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    final = _final(tmp / "run", metric)
    try:  # an epoch with its eval, start-up and compiles left out
        epoch = round(metrics.seconds_per_eval(tmp / "run"), 2)
    except ValueError:  # fewer than two evals
        epoch = None
    return {
        "row": name,
        "seed": seed,
        "metric": metric,
        "value": final[metric],
        "eval": {k: v for k, v in final.items() if k.startswith("eval_")},  # AP50, top-5, ...
        "step": final["step"],
        "wall_s": round(wall, 1),
        "seconds_per_eval": epoch,
        "host": host.last_summary(tmp / "run"),
        "command": " ".join(command[1:]),
        "tmp": str(tmp),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {list(ROWS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args, extra = parser.parse_known_args()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="results_rows_"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.rows.split(","):
        if name not in ROWS:
            parser.error(f"unknown row {name!r}; known: {list(ROWS)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run_row(name, seed, out, extra)
            results.append(result)
            print(
                f"{name} seed {seed}: {result['metric']} {result['value']:.4f} "
                f"in {result['wall_s']:.0f} s",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(result["tmp"], ignore_errors=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}))


if __name__ == "__main__":
    main()
