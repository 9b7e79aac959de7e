"""The paired gap between two models' sweep results: sasa_jax.analysis.paired and its command
line, benchmarks/paired_gap.py."""

import pathlib
import sys

import pytest

from sasa_jax.analysis import paired

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "ablations" / "results"


def _row(variant: str, seed: int, top1: float, status: str = "done") -> dict:
    return {
        "cell": f"model.variant={variant}",
        "fields": {"model.variant": variant, "num_epochs": 10},
        "seed": seed,
        "status": status,
        "metrics": {"eval_top1": top1},  # a stopped run can have reported evals
    }


CONV = {"model.variant": "conv"}
ATTENTION = {"model.variant": "attention"}


def test_gap_error_and_interval_against_hand_worked_numbers():
    rows = [_row("conv", s, v) for s, v in [(0, 0.9), (1, 0.8), (2, 0.7), (7, 0.5)]]
    rows += [_row("attention", s, v) for s, v in [(2, 0.5), (0, 0.8), (1, 0.8), (3, 0.1)]]
    rows.append(_row("attention", 7, 0.0, status="failed"))
    gap = paired.paired_gap(rows, CONV, ATTENTION)
    # seeds 0-2 pair up (3 only ran attention, 7's attention run failed): differences 0.1, 0, 0.2
    assert gap.seeds == [0, 1, 2]
    assert gap.reference == pytest.approx([0.9, 0.8, 0.7])
    assert gap.other == pytest.approx([0.8, 0.8, 0.5])
    assert gap.gap == pytest.approx(0.1)
    assert gap.gap_std == pytest.approx(0.1)
    assert gap.standard_error == pytest.approx(0.1 / 3**0.5)
    half = 4.302652729911275 * 0.1 / 3**0.5  # Student's t, 97.5th percentile, 2 degrees of freedom
    assert gap.interval == pytest.approx((0.1 - half, 0.1 + half))


def test_field_values_match_as_strings():
    rows = [_row("conv", s, 0.9) for s in (0, 1)] + [_row("attention", s, 0.8) for s in (0, 1)]
    gap = paired.paired_gap(rows, {**CONV, "num_epochs": "10"}, {**ATTENTION, "num_epochs": "10"})
    assert gap.gap == pytest.approx(0.1)


def test_ambiguous_or_too_few_seeds_are_clear_errors():
    rows = [_row("conv", 0, 0.9), _row("conv", 0, 0.8), _row("conv", 1, 0.9)]
    rows += [_row("attention", s, 0.8) for s in (0, 1)]
    with pytest.raises(ValueError, match="seed 0 has more than one finished run of the reference"):
        paired.paired_gap(rows, CONV, ATTENTION)
    with pytest.raises(ValueError, match="1 seed.*at least 2"):
        paired.paired_gap(rows[2:], CONV, ATTENTION)
    with pytest.raises(ValueError, match="confidence"):
        paired.paired_gap(rows[2:], CONV, ATTENTION, confidence=95)


def test_the_command_line_on_the_kept_stem_sweeps(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import paired_gap

    argv = [
        "paired_gap.py",
        str(RESULTS / "stem_variant"),
        str(RESULTS / "stem_embeddings" / "results.json"),
        "--reference=model.variant=conv_stem_attention",
        "--other=results=stem_embeddings",
        "--percent",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    paired_gap.main()
    out = capsys.readouterr().out
    # the docs' 10-epoch table: conv stem 83.8 +- 1.2, the paper's stem 59.8 +- 6.1 (5 seeds each)
    assert "reference: 83.75 ± 1.23 over 5 seeds" in out
    assert "other: 59.76 ± 6.11 over 5 seeds" in out
    assert "gap (reference - other): 23.99" in out
    with pytest.raises(FileNotFoundError, match="results.json"):
        paired_gap.load_rows([str(RESULTS / "no_such_sweep")])
