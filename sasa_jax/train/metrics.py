"""Metric output of a training run: ``metrics.jsonl``, TensorBoard events and console progress.

Only the primary process writes. TensorBoard event files are written by tensorboardX, without
TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from typing import Any


class MetricWriter:
    """Appends one JSON object per call to ``workdir/metrics.jsonl`` (always with ``step``) and
    mirrors scalars to TensorBoard under ``workdir``."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(logdir=str(self.path.parent), flush_secs=10)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _plain(value):
    try:
        return value.item()
    except AttributeError:
        return value


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """Console progress: ``step/total``, loss, images/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True):
        self.total, self.enabled = total_steps, enabled
        self._start_step, self._start = start_step, time.perf_counter()

    def line(self, step: int, loss: float, images_per_sec: float) -> str:
        elapsed = time.perf_counter() - self._start
        done = max(step - self._start_step, 1)
        eta = datetime.timedelta(seconds=int(elapsed / done * (self.total - step)))
        width = len(str(self.total))
        return (
            f"step {step:>{width}}/{self.total} | loss {loss:.4f} | "
            f"{images_per_sec:,.0f} img/s | ETA {eta}"
        )

    def report(self, step: int, loss: float, images_per_sec: float) -> None:
        if self.enabled:
            print(self.line(step, loss, images_per_sec), flush=True)
