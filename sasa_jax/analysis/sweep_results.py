"""A sweep's results files: ``results.json`` (one row per run), ``results.md`` (per cell, mean ±
standard deviation over seeds of each eval metric, and the runs' count) and ``results.png``
(each metric per cell, the mean with the seeds' standard deviation as error bars and each
seed as a dot)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np


def cells(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows grouped by cell, in first-seen order."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["cell"], []).append(row)
    return out


def metric_names(rows: list[dict]) -> list[str]:
    """Every eval metric any finished run reported, ``eval_top1`` / ``eval_ap`` first."""
    names = sorted({k for r in rows for k in r["metrics"]})
    return sorted(names, key=lambda n: (n not in ("eval_top1", "eval_ap"), n))


def summary(values: list[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)``; the deviation is NaN for fewer than 2 values."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def _format(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = summary(values)
    return f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def markdown(rows: list[dict]) -> str:
    """The per-cell table, then one line per failed run."""
    names = metric_names(rows)
    fields = list(rows[0]["fields"]) if rows else []
    head = [*fields, *names, "wall s", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in cells(rows).values():
        done = [r for r in group if r["status"] == "done"]
        values = [str(group[0]["fields"][f]) for f in fields]
        values += [_format([r["metrics"][n] for r in done if n in r["metrics"]]) for n in names]
        walls = [r["wall_s"] for r in done]
        values.append(f"{np.mean(walls):.0f}" if walls else "–")
        failed = len(group) - len(done)
        values.append(f"{len(done)}" + (f" ({failed} failed)" if failed else ""))
        lines.append("| " + " | ".join(values) + " |")
    errors = [r for r in rows if r["status"] != "done"]
    if errors:
        lines += ["", "Runs that did not finish:", ""]
        lines += [f"- {r['cell']}/seed{r['seed']}: {r['status']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """One panel per metric: each cell's mean with the seeds' standard deviation, and the
    seeds as dots."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    names = metric_names(rows) or ["(no finished runs)"]
    groups = cells(rows)
    figure = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.0 * len(names)))
    axes = figure.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        for x, group in enumerate(groups.values()):
            values = [r["metrics"][name] for r in group if name in r["metrics"]]
            if not values:
                continue
            mean, std = summary(values)
            ax.errorbar(
                [x],
                [mean],
                yerr=[0 if np.isnan(std) else std],
                fmt="o",
                capsize=6,
                color="C0",
                markersize=8,
            )
            ax.plot([x] * len(values), values, ".", color="C1", alpha=0.8)
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write(workdir: str | pathlib.Path, rows: list[dict[str, Any]]) -> list[pathlib.Path]:
    """Writes the three results files into ``workdir`` and returns their paths."""
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / "results.json", root / "results.md", root / "results.png"]
    paths[0].write_text(json.dumps(rows, indent=1) + "\n")
    paths[1].write_text(markdown(rows))
    plot(rows, paths[2])
    return paths
