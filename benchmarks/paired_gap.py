"""Two models seed by seed, from sweep results files: the gap, its standard error, a t-interval.

    python benchmarks/paired_gap.py docs/ablations/results/stem_walls \
        --where=num_epochs=80 --reference=config=digits_clutter.py \
        --other=config=digits_clutter.py:variant=full_attention --percent [--json]

Each positional argument is a ``results.json`` or a folder holding one (``python -m
sasa_jax.sweep`` writes them; docs/ablations/results/ keeps the project's). ``--reference`` and
``--other`` pick each side's runs by their fields (``name=value``, repeatable); ``--where``
applies to both. Each row also has the field ``results``, its folder's name, to tell files
apart (``--other=results=stem_embeddings``). Runs of the same seed pair up; the gap is
``reference - other`` (``sasa_jax.analysis.paired``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from sasa_jax.analysis import paired, sweep_results


def _field(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name, value


def load_rows(paths: list[str]) -> list[dict]:
    """The rows of every ``results.json`` named (or held by a named folder), in order, each with
    its folder's name as the field ``results``."""
    rows = []
    for path in map(pathlib.Path, paths):
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist; pass a sweep's results.json or the folder holding it"
            )
        for row in json.loads(file.read_text()):
            rows.append({**row, "fields": {"results": file.parent.name, **row["fields"]}})
    return rows


def report(gap: paired.PairedGap, scale: float) -> str:
    """A per-seed table, then each side's mean ± std and the gap with its error."""
    lines = ["seed | reference | other | gap"]
    for seed, a, b in zip(gap.seeds, gap.reference, gap.other, strict=True):
        lines.append(f"{seed} | {a * scale:.2f} | {b * scale:.2f} | {(a - b) * scale:.2f}")
    for name, values in (("reference", gap.reference), ("other", gap.other)):
        mean, std = sweep_results.summary(values)
        lines.append(f"{name}: {mean * scale:.2f} ± {std * scale:.2f} over {len(values)} seeds")
    low, high = gap.interval
    lines.append(
        f"gap (reference - other): {gap.gap * scale:.2f} ± {gap.gap_std * scale:.2f} seed by "
        f"seed, standard error {gap.standard_error * scale:.2f}, "
        f"{gap.confidence:.0%} t-interval [{low * scale:.2f}, {high * scale:.2f}]"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or folders holding one")
    parser.add_argument("--reference", type=_field, action="append", required=True)
    parser.add_argument("--other", type=_field, action="append", required=True)
    parser.add_argument("--where", type=_field, action="append", default=[])
    parser.add_argument("--metric", default="eval_top1")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--percent", action="store_true", help="print the metric times 100")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rows = load_rows(args.results)
    where = dict(args.where)
    gap = paired.paired_gap(
        rows,
        reference={**where, **dict(args.reference)},
        other={**where, **dict(args.other)},
        metric=args.metric,
        confidence=args.confidence,
    )
    print(report(gap, 100.0 if args.percent else 1.0))
    if args.json:
        date = time.strftime("%Y-%m-%d")
        print(json.dumps({"date": date, "metric": args.metric, **gap.as_dict()}))


if __name__ == "__main__":
    main()
