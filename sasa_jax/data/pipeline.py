"""Grain pipelines: sharded, deterministic, resumable training batches and exact evaluation.

* Training: one global stream, a function of the seed alone -- a fresh order of all records
  each epoch (a permutation drawn from the seed and the epoch) and augmentation randomness
  that Grain derives from the seed and the global position. Process ``p`` of ``n`` decodes
  only block ``p`` of each global batch, so the global batch at every step is the same
  whatever the number of processes, and within an epoch the processes read disjoint parts
  that together are complete.
* Evaluation: process ``p`` reads the disjoint shard ``records[p::n]``.
* ``TrainIterator.get_state()``/``set_state()`` checkpoint the position; a restored iterator
  yields exactly the batches the original would have yielded next.
* Evaluation pads the last batch and marks real examples with ``mask``; every process runs the
  same number of batches, so each example counts exactly once across processes.
* ``prefetch_to_mesh`` keeps a few batches in flight onto the devices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]


def per_process_batch(global_batch: int, process_count: int, name: str = "batch_size") -> int:
    """The batch each process loads; raises ValueError if it does not divide evenly."""
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"{name} ({global_batch}) must be a positive multiple of the number of "
            f"processes ({process_count})"
        )
    return global_batch // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def shard(records: Sequence, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's disjoint shard of ``records`` (together the shards are complete)."""
    _check_process(process_index, process_count)
    return grain.MapDataset.source(records)[process_index::process_count]


class Augment(Protocol):
    """What ``train_dataset`` needs of an augmentation: one training example of a record
    (``TrainAugment`` for classification, ``DetectionAugment`` for detection), and an example
    of zeros with the batch's shapes and dtypes (compiling without data: ``sasa_jax.aot``)."""

    def example(self, record: dict[str, Any], rng: np.random.Generator) -> Batch: ...

    def empty(self) -> Batch: ...


class EvalExample(Protocol):
    """What ``eval_batches`` needs: the eval example of record ``index``, and an empty
    (``mask == False``) example for padding."""

    def __call__(self, index: int, record: dict[str, Any]) -> Batch: ...

    def empty(self) -> Batch: ...


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    augment: Augment

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Batch:
        return self.augment.example(record, rng)


def _to_iter(ds: grain.MapDataset, num_workers: int, num_threads: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 2))
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


class _EpochShuffle(grain.MapDataset):
    """``parent``'s records endlessly, in a fresh order each epoch: element ``i`` is record
    ``order_e[i % n]`` of epoch ``e = i // n``, where ``order_e`` is a permutation drawn from
    ``(seed, e)``. Holds two epochs' orders (4 bytes a record each): one lookup per element
    instead of Grain's index shuffle, which costs ~80 us a record on small datasets."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._count = seed, len(parent)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self._seed, epoch])
            order = rng.permutation(self._count).astype(np.int32)
            kept = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders = {**kept, epoch: order}  # replaced whole: safe across threads
        return order

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        epoch, j = divmod(i, self._count)
        return self._parent[int(self._order(epoch)[j])]

    def __str__(self) -> str:
        return f"_EpochShuffle(seed={self._seed})"


class _BatchBlocks(grain.MapDataset):
    """Process ``index``'s block of every global batch of ``parent``: local element ``j`` is
    global element ``(j // block) * block * count + index * block + j % block``."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count
        self._length = len(parent) // (block * count) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        batch, offset = divmod(j, self._block)
        return self._parent[(batch * self._count + self._index) * self._block + offset]

    def __str__(self) -> str:
        return f"_BatchBlocks(block={self._block}, index={self._index}, count={self._count})"


def train_dataset(
    records: Sequence,
    *,
    batch_size: int,
    augment: Augment,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int = 2,
) -> grain.IterDataset:
    """Endless training batches: ``augment``'s examples stacked, e.g. ``{"image": uint8
    [b, s, s, 3], "label": int32 [b]}`` for ``TrainAugment``.

    ``batch_size`` is the per-process batch ``b``; the global batch is ``b * process_count``.
    ``num_workers > 0`` decodes in that many worker
    processes (the caller must run under ``if __name__ == "__main__"`` with absl flags
    parsed); ``num_threads`` decodes in threads of this process (OpenCV releases the GIL).
    """
    _check_process(process_index, process_count)
    if not len(records):
        raise ValueError("train_dataset needs at least one record")
    ds = _EpochShuffle(grain.MapDataset.source(records), seed)
    ds = ds.random_map(_TrainExample(augment), seed=seed)
    ds = _BatchBlocks(ds, batch_size, process_index, process_count)
    ds = ds.batch(batch_size, drop_remainder=True)
    return _to_iter(ds, num_workers, num_threads)


@dataclasses.dataclass(frozen=True)
class _Indexed:
    records: Sequence
    example: EvalExample

    def __call__(self, index: int) -> Batch:
        return self.example(int(index), self.records[int(index)])


def eval_steps(num_examples: int, batch_size: int, process_count: int) -> int:
    """Eval batches every process runs: enough for the largest shard."""
    return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def eval_batches(
    records: Sequence,
    *,
    batch_size: int,
    example: EvalExample,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int = 2,
) -> Iterator[Batch]:
    """Padded eval batches of ``example``'s examples (``batch_size`` per process), e.g.
    ``{"image", "label", "mask"}`` for ``ClassificationEval``.

    ``example`` gets each record's position in ``records``. Padding rows are
    ``example.empty()`` (``mask == False``). Every process yields ``eval_steps(...)`` batches.
    """
    _check_process(process_index, process_count)
    ds = grain.MapDataset.range(len(records))[process_index::process_count]
    ds = ds.map(_Indexed(records, example))
    ds = ds.batch(
        batch_size,
        batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size),
    )
    steps = eval_steps(len(records), batch_size, process_count)
    count = 0
    for batch in _to_iter(ds, num_workers, num_threads):
        count += 1
        yield batch
    if count < steps:
        empty = jax.tree.map(lambda x: np.stack([x] * batch_size), example.empty())
        for _ in range(steps - count):
            yield empty


class TrainIterator:
    """Iterates a training ``IterDataset`` and remembers the position of the last batch
    handed out, even when batches are prefetched ahead (``prefetch_to_mesh``)."""

    def __init__(self, dataset: grain.IterDataset, state: dict | None = None):
        self._iterator = iter(dataset)
        if state is not None:
            self._iterator.set_state(state)
        self._state = self._iterator.get_state()

    def next_with_state(self) -> tuple[Batch, dict]:
        """The next batch and the iterator state right after it."""
        batch = next(self._iterator)
        return batch, self._iterator.get_state()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch, self._state = self.next_with_state()
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)
        self._state = state


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's part of a batch -> global arrays sharded along the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class prefetch_to_mesh:  # noqa: N801 - used like a function
    """Keeps ``size`` batches in flight onto ``sharding``'s devices.

    ``get_state()`` is the position after the last batch *yielded*, not the last one loaded,
    so a checkpoint taken between steps resumes exactly.
    """

    def __init__(self, iterator: TrainIterator, sharding: jax.sharding.Sharding, size: int = 2):
        self._iterator, self._sharding = iterator, sharding
        self._queue: collections.deque = collections.deque()
        self._state = iterator.get_state()
        self._size = max(size, 1)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) < self._size:
            batch, state = self._iterator.next_with_state()
            self._queue.append((to_global(batch, self._sharding), state))
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        """Drops the batches in flight and continues from ``state``."""
        self._queue.clear()
        self._iterator.set_state(state)
        self._state = state
