"""The shard format: Arrow IPC files, one record batch per sample, memory-mapped on read.

Reading: `Dataset[i]` for random access (views of the memory map), `Dataset.stream(order)`
for epochs (O_DIRECT read-ahead for samples not in the page cache, see shared.stream).
Both decode a record batch straight from its bytes (shared.sample_codec); the stream
plans its reads through the public methods `Dataset` implements for it (`StreamSource`).
A data set may also live on a filesystem URI (s3://..., see shared.storage).

Why this layout (figures from `specmill shards bench`, see README): an uncompressed Arrow
IPC file is the sample's bytes plus a small footer, so a memory-mapped read hands torch
the hidden states without a copy or a decode step, and `get_batch(i)` makes random access
cost the same as sequential. Parquet decodes pages (slower), compression is
CPU-bound on small machines, and a file per sample (what existing tools do) costs a
syscall storm and an unpicklable inode count.

Tensor columns are `large_binary` holding the raw little-endian bytes of one tensor; the
field metadata names its dtype and shape, so `pyarrow` alone can read a shard.

    sample_id          utf8          stable hash of (conversation, generation settings)
    source_index       int64         row index in the source data set
    num_tokens         int32         T
    input_ids          int32 [T]
    loss_mask          uint8 [T]     1 on the tokens the draft learns
    aux_hidden_states  dtype [T,3,H] the three auxiliary layers (see manifest convention)
    last_hidden_state  dtype [T,H]   the last layer (pre or post final norm, see manifest)
    position_ids       int32 [3,T]   optional: multimodal (mRoPE) positions
    modality_spans     utf8          optional: JSON [[kind, start, end), ...] placeholder spans
    temperature        float32       optional: sampling temperature of the answer
    finish_reason      utf8          optional: 'stop' / 'length' of the last answer
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from shared.manifest import (
    MANIFEST_NAME,
    DatasetHeader,
    Manifest,
    ManifestError,
    ShardInfo,
    TargetInfo,
    load_manifest,
    save_manifest,
)
from shared.sample_codec import FIELDS, Block, FooterError, SampleDecoder, ShardError, record_batch_blocks
from shared.storage import Location, fsync_dir
from shared.stream import DIRECT_ALIGN, SampleStream, open_direct, residency

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

log = logging.getLogger("specmill.shards")

# pyarrow marks every buffer over a map read-only, so torch warns on each view. The map is
# private (copy-on-write): writing into such a tensor is safe and never reaches the file.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

SHARD_SUFFIX = ".arrow"
DEFAULT_SHARD_BYTES = 256 << 20
TENSOR_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state", "position_ids")


class SampleError(ValueError):
    """A sample `ShardWriter.add` refuses (a field of the wrong shape, dtype or range); it is
    checked whole before any of it is written, so the open shard is left as it was."""


def shard_schema(header: DatasetHeader) -> pa.Schema:
    def tensor(name: str, dtype: str, shape: str, nullable: bool = False) -> pa.Field:
        return pa.field(name, pa.large_binary(), nullable=nullable,
                        metadata={"dtype": dtype, "shape": shape})

    h, dt = header.hidden_size, header.dtype
    return pa.schema(
        [
            pa.field("sample_id", pa.utf8(), nullable=False),
            pa.field("source_index", pa.int64(), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            tensor("input_ids", "int32", "[T]"),
            tensor("loss_mask", "uint8", "[T]"),
            tensor("aux_hidden_states", dt, f"[T,3,{h}]"),
            tensor("last_hidden_state", dt, f"[T,{h}]"),
            tensor("position_ids", "int32", "[3,T]", nullable=True),
            pa.field("modality_spans", pa.utf8()),
            pa.field("temperature", pa.float32()),
            pa.field("finish_reason", pa.utf8()),
        ],
        metadata={"specmill.hidden_size": str(h), "specmill.dtype": dt},
    )


# Bytes per element of the dtypes shard_schema's tensor columns name.
_ITEMSIZE = {"int32": 4, "uint8": 1, "bfloat16": 2, "float16": 2}
_IPC_ALIGNMENT = 8  # pyarrow's IPC writer pads every buffer of a record batch to this
_FOOTER_BLOCK_BYTES = 24  # the file footer's entry for each record batch (see sample_codec.record_batch_blocks)
_SAMPLE_ID_CHARS = 32  # factory.render.conversation_id


@dataclass(frozen=True, slots=True)
class ShardSize:
    """What samples of one data set take on disk, read off `shard_schema` and pyarrow's IPC
    writer, so another encoding (dtype, columns) changes it by itself:

    - `per_token`: the tensor columns whose shape has T (input_ids, loss_mask, the hidden states;
      position_ids for mRoPE targets), e.g. 4*H*2 + 4 + 1 bytes for bf16;
    - `per_sample`: an upper bound on the rest of a sample's record batch (its message, the
      scalar and text columns, buffer padding) and its footer entry;
    - `per_shard`: a shard file with no sample (the schema, the footer, the magic)."""

    per_token: int
    per_sample: int
    per_shard: int
    columns: tuple[tuple[str, int], ...] = ()  # per_token by column: (name, bytes per token)

    def bytes(self, *, tokens: int, samples: int, shards: int) -> int:
        return tokens * self.per_token + samples * self.per_sample + shards * self.per_shard


def shard_size(header: DatasetHeader, *, position_ids: bool = False) -> ShardSize:
    """The size model of `header`'s shards; `position_ids`: samples carry mRoPE positions."""
    schema = shard_schema(header)
    columns = []
    for f in schema:
        meta = f.metadata or {}
        if b"shape" not in meta or (f.name == "position_ids" and not position_ids):
            continue
        dims = meta[b"shape"].decode().strip("[]").split(",")
        if "T" not in dims:
            raise ValueError(f"shard_size: column {f.name} has shape {dims} without T; a per-sample tensor "
                             f"column needs its own term here")
        dtype = meta[b"dtype"].decode()
        if dtype not in _ITEMSIZE:
            raise ValueError(f"shard_size: column {f.name} has dtype {dtype!r}; add its size to _ITEMSIZE")
        columns.append((f.name, _ITEMSIZE[dtype] * math.prod(int(d) for d in dims if d != "T")))
    per_token = sum(n for _, n in columns)
    empty = _ipc_file_bytes(schema, [])
    one_token = _ipc_file_bytes(schema, [_probe_batch(schema, position_ids)]) - empty
    # A tensor's data buffer is padded to the alignment: at one token the padding is what it
    # is, at T tokens up to alignment - 1 bytes; the allowance covers any T.
    per_sample = one_token - per_token + len(columns) * (_IPC_ALIGNMENT - 1) + _FOOTER_BLOCK_BYTES
    return ShardSize(per_token=per_token, per_sample=per_sample, per_shard=empty, columns=tuple(columns))


def _probe_batch(schema: pa.Schema, position_ids: bool) -> pa.RecordBatch:
    """A one-token sample with the longest values its text columns hold (no modality spans)."""
    columns = []
    for f in schema:
        meta = f.metadata or {}
        if b"shape" in meta and (f.name != "position_ids" or position_ids):
            dims = meta[b"shape"].decode().strip("[]").split(",")
            n = _ITEMSIZE[meta[b"dtype"].decode()] * math.prod(1 if d == "T" else int(d) for d in dims)
            columns.append(pa.array([b"\0" * n], f.type))
        elif f.name == "sample_id":
            columns.append(pa.array(["0" * _SAMPLE_ID_CHARS], f.type))
        elif f.name == "finish_reason":
            columns.append(pa.array(["length"], f.type))
        else:
            columns.append(pa.nulls(1, f.type) if f.nullable else pa.array([0], f.type))
    return pa.record_batch(columns, schema=schema)


def _ipc_file_bytes(schema: pa.Schema, batches: list[pa.RecordBatch]) -> int:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().size


@dataclass(kw_only=True, slots=True)
class Sample:
    """One training sequence. Tensors are torch tensors (hidden states in the data set's dtype)."""

    sample_id: str
    source_index: int
    input_ids: torch.Tensor  # [T] integer
    loss_mask: torch.Tensor  # [T] 0/1
    aux_hidden_states: torch.Tensor  # [T, 3, H]
    last_hidden_state: torch.Tensor  # [T, H]
    position_ids: torch.Tensor | None = None  # [3, T]
    modality_spans: list[tuple[str, int, int]] = field(default_factory=list)
    temperature: float | None = None
    finish_reason: str | None = None


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends samples to a data set directory, committing whole shards atomically.

    A shard is written to a hidden temporary file, fsynced, hashed, renamed into place and
    only then listed in the manifest (itself replaced atomically). Whatever a killed writer
    left behind that the manifest does not list is deleted when the directory is opened
    again, and `done_ids()` tells the caller which samples are already safe.

    `directory` may also be a filesystem URI (`s3://bucket/prefix`, see shared.storage):
    a shard is then spooled to a local temporary file, hashed, uploaded as one object and
    only then listed; the manifest object is written after it.
    """

    def __init__(self, directory: str | os.PathLike | Location, header: DatasetHeader, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES):
        import torch

        self._torch = torch
        self.location = Location.parse(directory)
        self.dir = self.location.local if self.location.is_local else self.location.uri
        self.location.make_dirs()
        self.shard_bytes = shard_bytes
        self._torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[header.dtype]
        if self.location.size(MANIFEST_NAME) is not None:
            self.manifest = load_manifest(self.location)
            bad = header.mismatches(self.manifest.header)
            if bad:
                raise ManifestError(
                    f"{self.dir}: existing data set was made with other settings; use a new "
                    f"directory or the same settings. Differences (new != existing): " + "; ".join(bad)
                )
            if self.manifest.complete:
                raise ManifestError(f"{self.dir}: data set is already complete; nothing to append to")
        else:
            self.manifest = Manifest(header=header)
            save_manifest(self.location, self.manifest)
        self.header = self.manifest.header
        self.schema = shard_schema(self.header)
        self._remove_unlisted_files()
        self._next_index = 1 + max((_shard_number(s.file) for s in self.manifest.shards), default=-1)
        self._open: _OpenShard | None = None

    def done_ids(self) -> set[str]:
        """Sample ids already committed in listed shards."""
        ids: set[str] = set()
        for info in self.manifest.shards:
            if self.location.is_local:
                table = ipc.open_file(pa.memory_map(str(self.location.local / info.file))).read_all()
                ids.update(table.column("sample_id").to_pylist())
            else:
                ids.update(_RemoteShard(self.location, info, self.schema).column("sample_id").to_pylist())
        return ids

    def add(self, sample: Sample) -> None:
        batch = self._to_batch(sample)
        if self._open is None:
            self._open = _OpenShard(self.location, f"shard-{self._next_index:05d}{SHARD_SUFFIX}",
                                    self.schema, self.header.target.vocab_size)
            self._next_index += 1
        self._open.write(batch, sample)
        if self._open.bytes_written >= self.shard_bytes:
            self.commit()

    def commit(self) -> None:
        """Make every sample added so far durable and visible (no-op when none is pending)."""
        if self._open is None:
            return
        info, counts = self._open.finish()
        self._open = None
        self.manifest.shards.append(info)
        for token_id in np.flatnonzero(counts):
            self.manifest.token_counts[int(token_id)] = (
                self.manifest.token_counts.get(int(token_id), 0) + int(counts[token_id])
            )
        save_manifest(self.location, self.manifest)
        log.debug("committed %s (%d rows, %d tokens)", info.file, info.rows, info.tokens)

    def close(self, *, complete: bool = True, info: dict | None = None) -> Manifest:
        """Commit what is pending; mark the data set complete (no more appends) if asked."""
        self.commit()
        if info:
            self.manifest.info.update(info)
        self.manifest.complete = complete
        save_manifest(self.location, self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop the uncommitted shard (its samples will be produced again on resume)."""
        if self._open is not None:
            self._open.discard()
            self._open = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # -- internals

    def _remove_unlisted_files(self) -> None:
        listed = {s.file for s in self.manifest.shards}
        for name in self.location.list_files():
            stray_tmp = name.startswith(".") and name.endswith(".tmp")
            stray_shard = name.endswith(SHARD_SUFFIX) and name not in listed
            if stray_tmp or stray_shard:
                log.info("removing %s: left by an interrupted writer, not in the manifest", name)
                self.location.delete(name)

    def _to_batch(self, s: Sample) -> pa.RecordBatch:
        torch = self._torch
        where = f"sample {s.sample_id!r} (source_index {s.source_index})"
        t = int(s.input_ids.shape[0]) if s.input_ids.dim() == 1 else -1
        h = self.header.hidden_size
        expect = {
            "input_ids": ((t,), None),
            "loss_mask": ((t,), None),
            "aux_hidden_states": ((t, 3, h), self._torch_dtype),
            "last_hidden_state": ((t, h), self._torch_dtype),
        }
        if t <= 0:
            raise SampleError(f"{where}: field input_ids must be a non-empty 1-D tensor, "
                              f"got shape {tuple(s.input_ids.shape)}")
        if s.position_ids is not None:
            expect["position_ids"] = ((3, t), None)
        for name, (shape, dtype) in expect.items():
            value = getattr(s, name)
            if tuple(value.shape) != shape:
                raise SampleError(f"{where}: field {name} has shape {tuple(value.shape)}, expected {shape}")
            if dtype is not None and value.dtype != dtype:
                raise SampleError(f"{where}: field {name} has dtype {value.dtype}, expected {dtype} "
                                  f"(the data set's dtype is {self.header.dtype})")
        ids = s.input_ids.to(torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.header.target.vocab_size:
            raise SampleError(f"{where}: field input_ids holds ids outside [0, {self.header.target.vocab_size})")
        mask = s.loss_mask.to(torch.uint8)
        if int(mask.max()) > 1:
            raise SampleError(f"{where}: field loss_mask must hold only 0 and 1")
        for kind, start, end in s.modality_spans:
            if not (0 <= start < end <= t):
                raise SampleError(f"{where}: field modality_spans has span ({kind}, {start}, {end}) "
                                  f"outside [0, {t})")

        def raw(x) -> pa.Array:  # one value, built on the tensor's bytes without a copy
            data = pa.py_buffer(x.contiguous().view(torch.uint8).numpy())
            offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
            return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, data])

        pos = s.position_ids
        return pa.record_batch(
            [
                pa.array([s.sample_id], pa.utf8()),
                pa.array([s.source_index], pa.int64()),
                pa.array([t], pa.int32()),
                raw(s.input_ids.to(torch.int32)),
                raw(mask),
                raw(s.aux_hidden_states),
                raw(s.last_hidden_state),
                raw(pos.to(torch.int32)) if pos is not None else pa.nulls(1, pa.large_binary()),
                pa.array([json.dumps(s.modality_spans) if s.modality_spans else None], pa.utf8()),
                pa.array([s.temperature], pa.float32()),
                pa.array([s.finish_reason], pa.utf8()),
            ],
            schema=self.schema,
        )


class _OpenShard:
    """A shard being written under a temporary name (for a non-local data set: in a local
    spool directory, uploaded whole when finished)."""

    def __init__(self, location: Location, name: str, schema: pa.Schema, vocab_size: int):
        self.location, self.name = location, name
        self._spool = None if location.is_local else Path(tempfile.mkdtemp(prefix="specmill-spool-"))
        self.tmp = (location.local or self._spool) / f".{name}.{os.getpid()}.tmp"
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = ipc.new_file(self._sink, schema)
        self.rows = self.tokens = self.loss_tokens = self.bytes_written = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def write(self, batch: pa.RecordBatch, sample: Sample) -> None:
        self._writer.write_batch(batch)
        self.rows += 1
        self.tokens += batch.column("num_tokens")[0].as_py()
        mask = sample.loss_mask.numpy().astype(bool)
        self.loss_tokens += int(mask.sum())
        np.add.at(self.counts, sample.input_ids.numpy()[mask].astype(np.int64), 1)
        self.bytes_written = self._sink.tell()

    def finish(self) -> tuple[ShardInfo, np.ndarray]:
        self._writer.close()
        self._sink.flush()
        if self._spool is None:
            os.fsync(self._sink.fileno())
        self._sink.close()
        digest, size = Location.parse(self.tmp.parent).sha256(self.tmp.name)
        if self._spool is None:
            os.replace(self.tmp, self.location.local / self.name)
            fsync_dir(self.location.local)
        else:
            self.location.upload(self.tmp, self.name)
            shutil.rmtree(self._spool)
        info = ShardInfo(file=self.name, rows=self.rows, tokens=self.tokens,
                         loss_tokens=self.loss_tokens, bytes=size, sha256=digest)
        return info, self.counts

    def discard(self) -> None:
        # After a failed write (a full disk) closing the IPC writer fails again; the file goes anyway.
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()
        with contextlib.suppress(OSError):
            self._sink.close()
        self.tmp.unlink(missing_ok=True)
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)


# --------------------------------------------------------------------------- reading

# sample_codec decodes record batches by its own table of the fields: it must be shard_schema's.
if list(FIELDS) != shard_schema(DatasetHeader(
        target=TargetInfo(name="-", config_sha256="", tokenizer_sha256="", chat_template_sha256="",
                          vocab_size=1, num_hidden_layers=1),
        hidden_size=1, aux_layer_ids=(0, 0, 0))).names:
    raise RuntimeError("sample_codec.FIELDS must list shard_schema's fields in order")


class Dataset:
    """Random access to a shard data set: `len(ds)`, `ds[i]` -> dict of torch tensors;
    `ds.stream(order)` for reading a whole epoch (see shared.stream).

    `directory` is a local path (the fast path below) or a filesystem URI such as
    `s3://bucket/prefix` (see shared.storage: shards are then read through random-access
    file handles, one per thread, and the tensors own their bytes).

    Local shards are memory-mapped copy-on-write and opened lazily (again after a fork, so
    loader workers get their own maps). Tensors are views of the mapped bytes (no copy, no
    decode), valid while the data set is alive; writing into one changes only this
    process's copy of that page, never the file.
    """

    def __init__(self, directory: str | os.PathLike | Location, *, readahead_bytes: int = 32 << 20):
        self.location = Location.parse(directory)
        self.dir = self.location.local if self.location.is_local else self.location.uri
        self.manifest = load_manifest(self.location)
        self.header = self.manifest.header
        self._schema = shard_schema(self.header)
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards]).tolist()
        self._readers: dict[int, _MappedShard | _RemoteShard] = {}
        self._last_index = -2
        self.readahead_bytes = readahead_bytes
        self._pid = os.getpid()
        self._decoder = SampleDecoder(hidden_size=self.header.hidden_size, dtype=self.header.dtype)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.get(index)

    def __iter__(self) -> Iterator[dict[str, object]]:
        for i in range(len(self)):
            yield self[i]

    def stream(self, indices: Iterable[int] | None = None, *, direct: bool = True,
               readahead_bytes: int = 64 << 20, threads: int = 2, max_request: int = 16 << 20) -> SampleStream:
        """The samples of `indices` (default: all, in order), read ahead in background threads.

        Samples not in the page cache are read with O_DIRECT where the filesystem allows it
        (`direct=False`: always through the memory map); see shared.stream for why. Up to
        `readahead_bytes` are read ahead: for an in-order epoch, ranges of neighbouring
        samples of up to `max_request` bytes, read in file order by two threads; for a
        shuffled one, single samples. `threads` decode them and map cached samples in
        (two: with four, decoding threads contended with the consumer for the GIL and a
        warm epoch ran ~3% slower).
        """
        return SampleStream(self, range(len(self)) if indices is None else indices, direct=direct,
                            readahead_bytes=readahead_bytes, threads=threads, max_request=max_request)

    def sample_order(self, *, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                     worker: int = 0, num_workers: int = 1, shuffle: bool = True) -> np.ndarray:
        """The indices this (rank, worker) reads in `epoch`: a seeded permutation, cut to a
        multiple of `world_size` so every rank takes the same number of steps, then dealt
        round-robin to ranks and, within a rank, to loader workers."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker must lie in [0, {num_workers}), got {worker}")
        n = len(self)
        order = (np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
                 if shuffle else np.arange(n))
        order = order[: n - n % world_size]
        return order[rank::world_size][worker::num_workers]

    def lengths(self) -> np.ndarray:
        """Token count of every sample (for length bucketing), read from the small column only."""
        out = [self._shard(k).column("num_tokens").to_numpy() for k in range(len(self.manifest.shards))]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)

    def temperatures(self) -> np.ndarray:
        """Sampling temperature of every sample's answers (float32; NaN where the writer did
        not record one), read from the small column only."""
        out = [self._shard(k).column("temperature").to_numpy(zero_copy_only=False).astype(np.float32)
               for k in range(len(self.manifest.shards))]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number in the manifest, row in that shard) of sample `index`."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} samples")
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    # -- what shared.stream reads through (StreamSource)

    def get(self, index: int, *, readahead: bool = True) -> dict[str, object]:
        """Sample `index`, as `ds[index]`; `readahead`: ask the kernel for its bytes first
        (and, while reading in order, for what follows)."""
        shard, row = self.locate(index)
        source = self._shard(shard)
        if readahead and not source.remote:
            # Ask the kernel for the sample's bytes in one go (and, while reading in order,
            # for what follows): faulting them in page by page ran at half the disk's speed.
            # Not for a cached sample: asking costs 40 us even then, 4 probes cost 4.
            sequential = index % len(self) == self._last_index + 1
            if not source.cached(source.blocks()[row]):
                source.will_need(row, ahead=self.readahead_bytes if sequential else 0)
            self._last_index = index % len(self)
        if source.remote:
            return self._decoder.from_batch(source.batch(row), name=source.name, index=index)
        return self._decoder.from_bytes(source.view, 0, source.blocks()[row], name=source.name, index=index)

    def shard_file(self, shard: int) -> _MappedShard | None:
        """The open local file of `shard` (its blocks, page-cache residency, O_DIRECT
        descriptor); None when the data set is not local."""
        source = self._shard(shard)
        return None if source.remote else source

    def sample_bytes(self, index: int) -> int:
        """Bytes of sample `index`'s record batch (not local: the shard's mean)."""
        shard, row = self.locate(index)
        return self._shard(shard).sample_bytes(row)

    def decode_mapped(self, shard: int, rows: Iterable[int], indices: Iterable[int]) -> list[dict[str, object]]:
        """Rows of a local shard decoded from its memory map."""
        source = self._shard(shard)
        blocks = source.blocks()
        return [self._decoder.from_bytes(source.view, 0, blocks[row], name=source.name, index=index)
                for row, index in zip(rows, indices)]

    def decode_read(self, shard: int, rows: list[int], indices: list[int], read: Future) -> list[dict[str, object]]:
        """Consecutive rows of a local shard from their O_DIRECT read (runs in a stream thread)."""
        source = self._shard(shard)
        blocks = source.blocks()
        start, end = blocks[rows[0]].offset, blocks[rows[-1]].end
        try:
            data = pa.py_buffer(read.result())
        except (OSError, EOFError) as e:
            raise ShardError(f"{source.name}: reading bytes {start}-{end} failed ({e})") from None
        base = start - start % DIRECT_ALIGN
        view = memoryview(data)
        return [self._decoder.from_bytes(view, base, blocks[row], name=source.name, index=index)
                for row, index in zip(rows, indices)]

    # -- internals

    def _shard(self, shard: int) -> _MappedShard | _RemoteShard:
        if os.getpid() != self._pid:  # forked: maps are not shared safely across processes
            self._readers, self._pid = {}, os.getpid()
        opened = self._readers.get(shard)
        if opened is None:
            kind = _MappedShard if self.location.is_local else _RemoteShard
            opened = self._readers[shard] = kind(self.location, self.manifest.shards[shard], self._schema)
        return opened


class _MappedShard:
    """One open local shard: its private map, the IPC reader over it (its schema checked,
    columns read whole), the footer's block list (where each record batch's bytes lie,
    read once on first use) and, for streams, an O_DIRECT file descriptor."""

    remote = False

    def __init__(self, location: Location, info: ShardInfo, schema: pa.Schema):
        self._fd: int | None | bool = False  # False: not tried yet; None: O_DIRECT refused
        self.name = location.name(info.file)
        self.map, self.reader = open_shard(location, info, schema)
        self._base = pa.py_buffer(self.map).address
        self.view = memoryview(self.map)  # tensors are views of it (and keep the map alive)
        self._advised_end = 0  # read-ahead already asked for, up to this offset
        self._blocks: list[Block] | None = None

    def column(self, name: str) -> pa.Array:
        """One column of every row, copied out while faulting in only the pages it lies on
        (with the kernel's read-around, the trainer's `lengths()` cached the whole data set
        and made every stream of it take it for warm)."""
        with _no_read_around(self.map):
            return self.reader.read_all().column(name).combine_chunks()

    def will_need(self, row: int, *, ahead: int = 0) -> None:
        block = self.blocks()[row]
        start, end = block.offset, block.end
        if ahead and start < self._advised_end and end <= self._advised_end:
            return  # asked for already, with the read-ahead of an earlier sample
        end = min(end + ahead, len(self.map))
        start -= start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_WILLNEED, start, end - start)
        self._advised_end = end if ahead else self._advised_end

    def blocks(self) -> list[Block]:
        if self._blocks is None:
            view = memoryview(self.map)
            try:
                with _no_read_around(self.map):
                    blocks = record_batch_blocks(view)
            except FooterError as e:
                raise ShardError(f"{self.name}: {e}") from None
            finally:
                view.release()
            if len(blocks) != self.reader.num_record_batches:
                raise ShardError(f"{self.name}: footer lists {len(blocks)} record batches, reader sees "
                                 f"{self.reader.num_record_batches}")
            self._blocks = blocks
        return self._blocks

    def address(self, offset: int) -> int:
        """Where file byte `offset` lies in this process's memory."""
        return self._base + offset

    def cached(self, block: Block) -> bool:
        return residency().probably_cached(self.address(block.offset), block.end - block.offset)

    def sample_bytes(self, row: int) -> int:
        block = self.blocks()[row]
        return block.end - block.offset

    def direct_fd(self) -> int | None:
        if self._fd is False:
            self._fd = open_direct(self.name)
        return self._fd

    def __del__(self, _close=os.close) -> None:  # os may be gone at interpreter exit
        if type(self._fd) is int:  # not False (never tried) or None (refused)
            _close(self._fd)


class _RemoteShard:
    """One shard on a non-local filesystem: random-access reads, one reader per thread
    (stream threads read concurrently; an IPC reader is not meant to be shared)."""

    remote = True

    def __init__(self, location: Location, info: ShardInfo, schema: pa.Schema):
        self._location, self._info, self._schema = location, info, schema
        self.name = location.name(info.file)
        self._local = threading.local()
        _, self._local.reader = open_shard(location, info, schema)

    @property
    def reader(self) -> ipc.RecordBatchFileReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            _, reader = open_shard(self._location, self._info, self._schema)
            self._local.reader = reader
        return reader

    def batch(self, row: int) -> pa.RecordBatch:
        try:
            return self.reader.get_batch(row)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{self.name}: sample {row} of the shard is not readable ({e})") from None

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every row, reading only that column's bytes."""
        options = ipc.IpcReadOptions(included_fields=[FIELDS[name][0]])
        reader = ipc.open_file(self._location.open_random_access(self._info.file), options=options)
        return reader.read_all().column(0)

    def will_need(self, row: int, *, ahead: int = 0) -> None:
        pass

    def sample_bytes(self, row: int) -> int:
        return self._info.bytes // max(1, self._info.rows)


def map_copy_on_write(path: Path) -> mmap.mmap:
    """Map a file privately: reads are zero-copy page-cache hits; a write (a caller's
    in-place op on a tensor) lands in a private page and never reaches the file. A
    read-only map would turn that write into a segfault."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


@contextlib.contextmanager
def _no_read_around(mapped: mmap.mmap) -> Iterator[None]:
    """Fault in only the pages touched (the footer, when opening): the kernel's read-around
    on a fault is read_ahead_kb (8 MB on the machines this was built on), which would
    cache the last samples' bytes and make a stream take them for warm."""
    mapped.madvise(mmap.MADV_RANDOM)
    try:
        yield
    finally:
        mapped.madvise(mmap.MADV_NORMAL)


def open_shard(location: Location, info: ShardInfo,
               schema: pa.Schema) -> tuple[mmap.mmap | None, ipc.RecordBatchFileReader]:
    """Open a listed shard, checking what is cheap to check: size, footer, schema, rows.
    Local shards are mapped (the map is returned too); others get a random-access handle."""
    name = location.name(info.file)
    size = location.size(info.file)
    if size is None:
        raise ShardError(f"{name}: listed in the manifest but missing")
    if size != info.bytes:
        raise ShardError(f"{name}: {size} bytes on disk, manifest says {info.bytes} (truncated or replaced)")
    mapped = None
    try:
        if location.is_local:
            mapped = map_copy_on_write(location.local / info.file)
            with _no_read_around(mapped):
                reader = ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
        else:
            reader = ipc.open_file(location.open_random_access(info.file))
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise ShardError(f"{name}: not a readable Arrow IPC file ({e})") from None
    if not reader.schema.equals(schema, check_metadata=True):
        raise ShardError(f"{name}: schema does not match the manifest "
                         f"(file has hidden_size={reader.schema.metadata.get(b'specmill.hidden_size')}, "
                         f"dtype={reader.schema.metadata.get(b'specmill.dtype')})")
    if reader.num_record_batches != info.rows:
        raise ShardError(f"{name}: {reader.num_record_batches} samples, manifest says {info.rows}")
    return mapped, reader


# --------------------------------------------------------------------------- verifying


@dataclass(kw_only=True, slots=True)
class VerifyReport:
    directory: Path | str
    shards_ok: int = 0
    samples: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify(directory: str | os.PathLike | Location, *, progress: bool = False) -> VerifyReport:
    """Check every shard's checksum, every sample's shapes, ids and the manifest's totals."""
    from tqdm import tqdm

    location = Location.parse(directory)
    report = VerifyReport(directory=location.local or location.uri)
    try:
        manifest = load_manifest(location)
    except ManifestError as e:
        report.errors.append(str(e))
        return report
    ds = Dataset(location)
    schema = shard_schema(manifest.header)
    seen: dict[str, str] = {}
    counts = np.zeros(manifest.header.target.vocab_size, dtype=np.int64)
    start = 0
    for info in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        name = location.name(info.file)
        shard_start, start = start, start + info.rows
        try:
            open_shard(location, info, schema)
            digest, _ = location.sha256(info.file)
            if digest != info.sha256:
                raise ShardError(f"{name}: sha256 {digest[:16]}... != manifest {info.sha256[:16]}... (corrupt)")
            tokens = loss_tokens = 0
            for i in range(shard_start, shard_start + info.rows):
                sample = ds[i]
                if sample["sample_id"] in seen:
                    raise ShardError(f"{name}: sample {sample['sample_id']!r} also in {seen[sample['sample_id']]}")
                seen[sample["sample_id"]] = info.file
                mask = sample["loss_mask"].numpy().astype(bool)
                tokens += mask.size
                loss_tokens += int(mask.sum())
                np.add.at(counts, sample["input_ids"].numpy()[mask].astype(np.int64), 1)
            if (tokens, loss_tokens) != (info.tokens, info.loss_tokens):
                raise ShardError(f"{name}: holds {tokens} tokens ({loss_tokens} loss-masked), "
                                 f"manifest says {info.tokens} ({info.loss_tokens})")
        except ShardError as e:
            report.errors.append(str(e))
            continue
        report.shards_ok += 1
        report.samples += info.rows
        report.tokens += info.tokens
    if not report.errors:
        listed = {i: c for i, c in manifest.token_counts.items()}
        actual = {int(i): int(counts[i]) for i in np.flatnonzero(counts)}
        if listed != actual:
            report.errors.append(f"{location.name(MANIFEST_NAME)}: token_counts do not match the shards' "
                                 f"loss-masked tokens")
    return report


def _shard_number(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(SHARD_SUFFIX))
