"""Seconds per epoch of finished (or running) training runs, from their TensorBoard events.

    python benchmarks/epoch_walls.py /tmp/conv_run /tmp/attention_run [--json]

For each workdir: its evals, the mean wall seconds from one eval to the next (an epoch with its
eval, when the run evaluates once an epoch; start-up and compiles fall before the first eval)
and, for every workdir after the first, that time as a multiple of the first's. Runs compare
only when they ran alike (one at a time on an otherwise idle machine, or side by side).
"""

from __future__ import annotations

import argparse
import json
import time

from sasa_jax.train import metrics


def epoch_walls(workdirs: list[str]) -> list[dict]:
    """One row per workdir: ``evals``, ``seconds_per_eval`` and ``ratio`` to the first."""
    rows = []
    for workdir in workdirs:
        seconds = metrics.seconds_per_eval(workdir)
        rows.append(
            {
                "workdir": workdir,
                "evals": len(metrics.eval_times(workdir)),
                "seconds_per_eval": round(seconds, 3),
                "ratio": round(seconds / rows[0]["seconds_per_eval"], 3) if rows else 1.0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="runs' --workdir; ratios are to the first")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rows = epoch_walls(args.workdirs)
    for row in rows:
        print(
            f"{row['workdir']}: {row['evals']} evals, {row['seconds_per_eval']:.2f} s from one "
            f"to the next ({row['ratio']:.2f}x the first)"
        )
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": rows}))


if __name__ == "__main__":
    main()
