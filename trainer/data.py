"""Batches from a shard data set: seeded order, packing to a token budget, background
prefetch, split across data-parallel ranks, and a position that resumes exactly.

Order: epoch e reads `Dataset.sample_order(seed, epoch=e)` (a seeded permutation) minus the
held-out validation samples. Micro-batches are packed greedily in that order: samples are
concatenated into one row until the next one would pass `token_budget` (a sample longer
than `max_seq_len` is cut to its first `max_seq_len` tokens). A micro-batch never spans two
epochs, so a position in the stream is just (epoch, cursor = index in the epoch's order of
the next sample): the same position always yields the same micro-batches, which is what
makes resume exact.

One optimizer step takes the next G = world_size x micro_batches micro-batches of this one
global stream (a step may take the last of one epoch and the first of the next); rank r
gets the r-th run of `micro_batches` of them. Every rank packs the same global stream and
reads only its own samples, so the union of the ranks' micro-batches does not depend on the
rank count: 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches train on the same data,
and (gradients being averaged over micro-batches and ranks alike) to the same weights. The
position is the global stream's, the same on every rank: a run stopped on N ranks resumes
on M with the same global batch, each rank deriving its share from it (elastic resume).

A background thread reads and packs `prefetch` steps ahead (pyarrow releases the GIL on
its memory-mapped reads); `wait_seconds` counts how long the training loop was blocked on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch

from shared.shards import Dataset
from trainer.config import DataConfig

log = logging.getLogger("specmill.trainer")

# The validation split is the first `val_samples` of the order of an epoch no run reaches.
_VAL_EPOCH = 2**62


@dataclass(kw_only=True, slots=True)
class Position:
    epoch: int = 0
    cursor: int = 0


@dataclass(kw_only=True, slots=True)
class Batch:
    """Samples packed into rows; doc_ids tell them apart (attention never crosses samples)."""

    input_ids: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L] bool
    doc_ids: torch.Tensor  # [B, L] int64, one id per packed sample
    position_ids: torch.Tensor  # [B, L] int64, restarting at 0 in each sample
    aux_hidden_states: torch.Tensor  # [B, L, 3, H] (the data set's dtype)
    last_hidden_state: torch.Tensor  # [B, L, H]
    samples: int
    after: Position  # the stream's position once this batch is consumed

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def pin_memory(self) -> Batch:
        return replace(self, **{k: getattr(self, k).pin_memory() for k in _TENSORS})

    def to(self, device: torch.device) -> Batch:
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=True) for k in _TENSORS})


_TENSORS = ("input_ids", "loss_mask", "doc_ids", "position_ids", "aux_hidden_states", "last_hidden_state")


def pack(samples: list[dict[str, Any]], max_seq_len: int, after: Position) -> Batch:
    """Concatenate samples into one row [1, L] (each cut to max_seq_len tokens)."""
    cut = [{k: s[k][:max_seq_len] for k in ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state")}
           for s in samples]
    lengths = [len(c["input_ids"]) for c in cut]

    def cat(name: str) -> torch.Tensor:  # copies out of the read-only memory map
        return torch.cat([c[name] for c in cut])[None]

    return Batch(
        input_ids=cat("input_ids").long(),
        loss_mask=cat("loss_mask").bool(),
        doc_ids=torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(lengths)])[None],
        position_ids=torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])[None],
        aux_hidden_states=cat("aux_hidden_states"),
        last_hidden_state=cat("last_hidden_state"),
        samples=len(samples),
        after=after,
    )


def left_out(ds: Dataset, config: DataConfig) -> np.ndarray:
    """Indices (sorted) of the samples that data.temperatures leaves out; none without it."""
    if config.temperatures is None:
        return np.zeros(0, dtype=np.int64)
    wanted = list(config.temperatures)
    temps = ds.temperatures()
    missing = np.flatnonzero(np.isnan(temps))
    if len(missing):
        shard, row = ds.locate(int(missing[0]))
        raise ValueError(f"data.temperatures = {wanted}: {len(missing)} of {len(ds)} samples in {ds.dir} record no "
                         f"temperature (the first: sample {missing[0]}, row {row} of "
                         f"{ds.manifest.shards[shard].file}, field temperature is null); drop data.temperatures "
                         "to train on every sample")
    # float32 in the shards: 0.7 comes back as 0.69999999
    keep = np.isclose(temps[:, None], np.asarray(wanted, dtype=np.float32)[None, :], rtol=0, atol=1e-4).any(axis=1)
    if not keep.any():
        present = ", ".join(f"{t:g} ({n})" for t, n in zip(*np.unique(temps.round(4), return_counts=True)))
        raise ValueError(f"data.temperatures = {wanted}: no sample of {ds.dir} was generated at these temperatures; "
                         f"it holds (temperature (samples)): {present}")
    return np.flatnonzero(~keep)


def split_validation(ds: Dataset, *, seed: int, val_samples: int,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the held-out samples (sorted), none of them in `exclude`."""
    order = ds.sample_order(seed=seed, epoch=_VAL_EPOCH)
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, exclude)]
    if val_samples >= len(order):
        raise ValueError(f"data.val_samples ({val_samples}) leaves nothing to train on in a data set of "
                         f"{len(order)} samples" + (" (after data.temperatures)" if len(order) < len(ds) else "")
                         + "; lower it")
    return np.sort(order[:val_samples])


class PackedLoader:
    """An endless stream of this rank's share of each step's micro-batches, with background prefetch.

    `next()` gives a list of `micro_batches` Batches (one step on this rank). `state_dict()`
    is the position after the last step handed to the caller (not after what the thread has
    read ahead), the same on every rank; `load_state_dict()` restarts the stream there.
    """

    def __init__(self, ds: Dataset, config: DataConfig, *, seed: int, exclude: np.ndarray,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.ds, self.config, self.seed = ds, config, seed
        self.pin_memory = pin_memory  # page-locked batches copy to a GPU asynchronously
        self.rank, self.world_size = rank, world_size
        self._exclude = exclude
        self._lengths = np.minimum(ds.lengths(), config.max_seq_len)
        self._position = Position()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        if len(self.epoch_order(0)) == 0:
            raise ValueError(f"no training samples in {ds.dir} ({len(ds)} samples, {len(exclude)} held out)")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch `epoch` (the same on every rank)."""
        order = self.ds.sample_order(seed=self.seed, epoch=epoch)
        return order[~np.isin(order, self._exclude)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._position.epoch, "cursor": self._position.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self._position = Position(epoch=int(state["epoch"]), cursor=int(state["cursor"]))

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.config.prefetch)
            self._thread = threading.Thread(target=self._produce, args=(self._position,),
                                            name="specmill-prefetch", daemon=True)
            self._thread.start()
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._position = item[-1].after
        return item

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # unblock a put() on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread = None

    # -- the producer thread

    def _produce(self, start: Position) -> None:
        try:
            for step in self._steps(start):
                while not self._stop.is_set():
                    try:
                        self._queue.put(step, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception as e:  # handed to the training loop, which re-raises it
            self._queue.put(e)

    def _steps(self, start: Position) -> Iterator[list[Batch]]:
        """Per step: this rank's micro-batches, read and packed; each carries the step's end position.

        The samples come from one `Dataset.stream` over this rank's indices in the order the
        steps take them (a second walk of the same plan, ahead of this one): it reads ahead,
        uncached samples with O_DIRECT, cached ones through the map
        (shared.stream). `pack` copies the tensors, so the stream's buffers go back at once.
        """
        ahead = (int(i) for micro, _ in self._rank_steps(start) for indices in micro for i in indices)
        with self.ds.stream(ahead) as samples:
            for micro, after in self._rank_steps(start):
                step = [pack([next(samples) for _ in indices], self.config.max_seq_len, after) for indices in micro]
                yield [b.pin_memory() for b in step] if self.pin_memory else step
                if self._stop.is_set():
                    return

    def _rank_steps(self, start: Position) -> Iterator[tuple[list[np.ndarray], Position]]:
        """Per step from `start`: this rank's micro-batches (sample indices) and the step's end position."""
        per_rank = self.config.micro_batches
        plan = self._plan(start)
        while True:
            group = [next(plan) for _ in range(self.world_size * per_rank)]
            yield [indices for indices, _ in group[self.rank * per_rank:(self.rank + 1) * per_rank]], group[-1][1]

    def _plan(self, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
        """The global micro-batch stream from `start`, as (sample indices, position after it);
        lengths only, no reads."""
        epoch, cursor = start.epoch, start.cursor
        budget = self.config.token_budget
        while True:
            order = self.epoch_order(epoch)
            while cursor < len(order):
                end, tokens = cursor, 0
                while end < len(order) and (end == cursor or tokens + self._lengths[order[end]] <= budget):
                    tokens += int(self._lengths[order[end]])
                    end += 1
                after = Position(epoch=epoch, cursor=end) if end < len(order) else Position(epoch=epoch + 1)
                yield order[cursor:end], after
                cursor = end
            epoch, cursor = epoch + 1, 0


def validation_batches(ds: Dataset, indices: np.ndarray, config: DataConfig) -> Iterator[Batch]:
    """The held-out samples packed in index order (no prefetch: validation is short)."""
    lengths = np.minimum(ds.lengths(), config.max_seq_len)
    group: list[int] = []
    tokens = 0
    for i in (int(i) for i in indices):
        if group and tokens + int(lengths[i]) > config.token_budget:
            yield pack([ds[j] for j in group], config.max_seq_len, Position())
            group, tokens = [], 0
        group.append(i)
        tokens += int(lengths[i])
    if group:
        yield pack([ds[j] for j in group], config.max_seq_len, Position())


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 over the manifest header and every shard's checksum: names this data set's content."""
    m = ds.manifest
    header = {k: v for k, v in m.to_json().items() if k not in ("shards", "token_counts", "complete", "info")}
    shards = [[s.file, s.rows, s.sha256] for s in m.shards]
    return hashlib.sha256(json.dumps([header, shards], sort_keys=True).encode()).hexdigest()
