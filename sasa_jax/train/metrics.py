"""Metric output of a training run: ``metrics.jsonl``, TensorBoard events and console progress;
and when a run's evals happened, read back from its events (``eval_times``).

Only the primary process writes. TensorBoard event files are written by tensorboardX, without
TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import struct
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


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """The JSON objects of a one-object-per-line file, in order."""
    lines = pathlib.Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    return read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


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


def eval_times(workdir: str | pathlib.Path) -> list[tuple[int, float]]:
    """``(step, wall time)`` of each eval a run logged, in step order, from its TensorBoard events.

    An eval's time is when its first ``eval_*`` scalar was written (Unix seconds). A resumed run
    adds a second events file; its evals are read as well. Raises ``FileNotFoundError`` if the
    workdir has no events file.
    """
    paths = sorted(pathlib.Path(workdir).glob("events.out.tfevents.*"))
    if not paths:
        raise FileNotFoundError(f"no TensorBoard events in {workdir}: is it a run's --workdir?")
    first: dict[int, float] = {}
    for path in paths:
        for event in _events(path):
            if any(v.tag.startswith("eval_") for v in event.summary.value):
                first[event.step] = min(first.get(event.step, event.wall_time), event.wall_time)
    return sorted(first.items())


def seconds_per_eval(workdir: str | pathlib.Path) -> float:
    """Mean wall seconds from one eval to the next: the time of an epoch, with its eval, when a
    run evaluates once an epoch (start-up and compiles fall before the first eval; a resumed
    run's pause and restart fall in the interval across it). Raises ``ValueError`` for a run
    with fewer than two evals."""
    times = eval_times(workdir)
    if len(times) < 2:
        raise ValueError(f"{workdir} logged {len(times)} eval(s); need two to time one interval")
    return (times[-1][1] - times[0][1]) / (len(times) - 1)


def _events(path: pathlib.Path):
    """The ``Event`` protos of one TFRecord events file (length, CRC, data, CRC per record;
    the CRCs are not checked)."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        if start + length + 4 > len(data):  # a record still being written
            return
        event = event_pb2.Event()
        event.ParseFromString(data[start : start + length])
        yield event
        offset = start + length + 4
