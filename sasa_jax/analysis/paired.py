"""Two models compared seed by seed: the paired gap in one eval metric, from sweep results rows.

Rows are ``results.json`` rows (``sweep_results``): each has ``fields``, ``seed``, ``status``
and ``metrics``. A side is picked by field values (``{"config": "digits_clutter.py"}``); runs of
the two sides with the same seed form a pair. The gap's error is the standard error of the
per-seed differences, and its interval Student's t at ``n - 1`` degrees of freedom (a paired
t-interval: valid whether or not a seed's two runs are correlated).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class PairedGap:
    """``reference - other`` over the seeds both sides ran.

    ``seeds``, ``reference`` and ``other`` are per-seed, in seed order; ``gap`` is the mean of
    the differences, ``gap_std`` their sample standard deviation, ``standard_error``
    ``gap_std / sqrt(n)`` and ``interval`` the two-sided ``confidence`` t-interval of ``gap``.
    """

    seeds: list[int]
    reference: list[float]
    other: list[float]
    gap: float
    gap_std: float
    standard_error: float
    confidence: float
    interval: tuple[float, float]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _matches(row: dict, where: dict[str, str]) -> bool:
    return all(str(row["fields"].get(name)) == value for name, value in where.items())


def _by_seed(rows: list[dict], where: dict[str, str], metric: str, side: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for row in rows:
        if row["status"] != "done" or not _matches(row, where) or metric not in row["metrics"]:
            continue
        if row["seed"] in out:
            raise ValueError(
                f"seed {row['seed']} has more than one finished run of the {side} side "
                f"({where}); narrow the sides with more field values (e.g. the commit)"
            )
        out[row["seed"]] = float(row["metrics"][metric])
    return out


def paired_gap(
    rows: list[dict],
    reference: dict[str, str],
    other: dict[str, str],
    metric: str = "eval_top1",
    confidence: float = 0.95,
) -> PairedGap:
    """The gap ``reference - other`` in ``metric`` over the seeds both sides finished.

    ``reference`` and ``other`` map field names to values, compared as strings. Raises
    ``ValueError`` when a side matches two runs of one seed, or fewer than two seeds pair up.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    ref = _by_seed(rows, reference, metric, "reference")
    oth = _by_seed(rows, other, metric, "other")
    seeds = sorted(set(ref) & set(oth))
    if len(seeds) < 2:
        raise ValueError(
            f"{len(seeds)} seed(s) have finished runs of both sides (reference: seeds "
            f"{sorted(ref)}, other: seeds {sorted(oth)}); a paired gap needs at least 2"
        )
    a = np.array([ref[s] for s in seeds])
    b = np.array([oth[s] for s in seeds])
    diff = a - b
    std = float(diff.std(ddof=1))
    se = std / len(seeds) ** 0.5
    half = float(stats.t.ppf(0.5 + confidence / 2, df=len(seeds) - 1)) * se
    gap = float(diff.mean())
    return PairedGap(
        seeds=seeds,
        reference=a.tolist(),
        other=b.tolist(),
        gap=gap,
        gap_std=std,
        standard_error=se,
        confidence=confidence,
        interval=(gap - half, gap + half),
    )
