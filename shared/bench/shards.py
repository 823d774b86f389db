"""`specmill shards bench`: storage layouts measured against this machine's own limits.

One run generates realistic samples once (`shared.synth`), writes every layout from them,
and reads each back until the four tensors a draft trains on (input_ids, loss_mask,
aux_hidden_states, last_hidden_state) are torch tensors in hand. Every read path ends the
same way: each tensor is copied into one reused buffer, which is what a loader does when it
builds a batch and guarantees every byte was read (a mapping that is never touched measures
nothing). MB are the bytes of those four tensors, 1 MB = 1e6 bytes.

The limits are measured in the same run and the same way:
- memory copy: a single-threaded torch copy of a large buffer (bigger than the reads'
  working set) into the same reused buffer, cut into the data set's own tensor sizes, run
  right before every warm pass of every format; a format's warm read (best pass) is
  compared to the best of its own interleaved copies.
- disk: a sequential O_DIRECT read of a file written in this run into one pre-faulted
  buffer in huge pages, in 4 MiB requests, in 16 MiB ones and in 4 MiB ones two at a time,
  the fastest counting (the stream reads 4 MiB pieces, two at a time, into such buffers:
  `shared.stream.LandingReader`), taken right
  before and right after every cold read (the disk here drifts by 2x within minutes), and
  each cold read is compared to the mean of its own two probes; each format is read cold
  `cold_passes` times and the median round counts.
- disk, spread: 16 MiB reads rotated over `spread_buffers` such buffers (diagnostic). On
  the VM this was built on the disk delivers less the more distinct memory its reads land
  in (one 4-16 MiB buffer 2.2-3.0 GB/s, 32 MiB or more in any split 1.8-1.9 GB/s: medians
  of 3 rounds, same file, same minutes), which is why the stream no longer reads straight
  into the buffers it hands out; the spread figure shows what that would cost.

Warm = the layout's files are in the page cache and the reader is opened afresh (so a
memory map pays its page faults); cold = after `sync; echo 3 > /proc/sys/vm/drop_caches`.
Everything runs on one torch thread; pyarrow keeps its own thread pool, as a loader would.

`arrow-ipc` is the shipped format read through the API the trainer's loader calls,
`shared.shards.Dataset.stream(order)` (O_DIRECT read-ahead for samples not in the page
cache, views of the memory map for those that are; random access through `Dataset[i]`).
`arrow-ipc-getitem` reads the same files through `Dataset[i]` in order, and
`arrow-ipc-views` as bare views of the columns' buffers, to show what each reader costs
on top of the layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from shared.stream import direct_buffer

if TYPE_CHECKING:
    import torch

    from shared.shards import Sample
    from shared.synth import SynthConfig

log = logging.getLogger("specmill.bench")

TENSOR_KEYS = ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state")
HIDDEN_KEYS = ("aux_hidden_states", "last_hidden_state")
SHIPPED = "arrow-ipc"
BASELINE = "torch-load"  # AngelSlim: one torch.save pickle per sample, torch.load without mmap
GOALS = {"warm_read_ratio": 0.8, "cold_read_ratio": 0.8, "speedup_vs_torch_save": 2.0}
_MB = 1e6
_DIRECT_CHUNK = 16 << 20  # O_DIRECT read size, a multiple of any block size
_PROBE_SMALL = 4 << 20  # the stream's read size (shared.stream.LandingReader)


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    directory: Path | None = None  # scratch parent; a fresh temporary directory is made inside
    samples: int = 256  # ~2 GB at the defaults: cold reads of about a second each, a 2-3 minute run
    hidden_size: int = 2048
    mean_tokens: int = 512
    seed: int = 0
    formats: tuple[str, ...] = ()  # empty: every format
    cold: bool = True  # cold reads drop the page cache: needs root
    warm_passes: int = 3  # warm figure = best pass
    # cold figure = the median of this many rounds, each read compared to its own two probes
    cold_passes: int = 3
    random_seconds: float = 1.0  # time spent on random access per format
    disk_probe_bytes: int = 1 << 30
    spread_buffers: int = 4  # the spread probe's buffers (see the module doc)
    keep: bool = False  # keep the written layouts
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("samples", "hidden_size", "mean_tokens", "warm_passes", "cold_passes", "disk_probe_bytes",
                     "spread_buffers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench: {name} must be positive, got {getattr(self, name)}")
        if self.random_seconds <= 0:
            raise ValueError(f"bench: random_seconds must be positive, got {self.random_seconds}")
        if self.disk_probe_bytes % _DIRECT_CHUNK:
            raise ValueError(f"bench: disk_probe_bytes must be a multiple of {_DIRECT_CHUNK >> 20} MiB "
                             f"(O_DIRECT reads whole aligned chunks), got {self.disk_probe_bytes}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"bench: formats has unknown {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(FORMATS)}")
        if self.directory is not None and not Path(self.directory).is_dir():
            raise ValueError(f"bench: directory {self.directory} does not exist; create it or leave it out")
        if self.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
            raise ValueError("bench: cold reads drop the page cache, which needs root "
                             "(write access to /proc/sys/vm/drop_caches); run as root or pass --no-cold")

    def selected(self) -> list[Format]:
        return [FORMATS[name] for name in (self.formats or tuple(FORMATS))]

    def synth(self) -> SynthConfig:
        from shared.synth import SynthConfig

        max_tokens = max(4096, 8 * self.mean_tokens)
        return SynthConfig(samples=self.samples, hidden_size=self.hidden_size, seed=self.seed,
                           mean_tokens=self.mean_tokens, max_tokens=max_tokens)


# --------------------------------------------------------------------------- layouts
# A layout is what lies on disk; a format is a layout plus the way it is read. Two formats
# can share one layout (torch.save files read with and without mmap).

Writer = Callable[[Iterable["Sample"], Path, "SynthConfig"], None]


class Reader(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Mapping[str, object]: ...


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    write: Writer


def _by_index(reader: Reader, indices: Sequence[int]) -> Iterable[Mapping[str, object]]:
    return (reader[i] for i in indices)


def _by_stream(reader: Reader, indices: Sequence[int]) -> Iterable[Mapping[str, object]]:
    return reader.stream(indices)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    label: str
    layout: Layout
    open: Callable[[Path], Reader]
    # How a pass reads samples in a given order (warm and cold figures); random access
    # always uses reader[i].
    read: Callable[[Reader, Sequence[int]], Iterable[Mapping[str, object]]] = _by_index


def _write_shipped(samples: Iterable[Sample], directory: Path, synth: SynthConfig) -> None:
    from shared.shards import ShardWriter

    writer = ShardWriter(directory, synth.header(), shard_bytes=synth.shard_bytes)
    for sample in samples:
        writer.add(sample)
    writer.close()


def _one_value(x: torch.Tensor) -> pa.Array:
    """A one-row large_binary array over the tensor's bytes (no copy)."""
    import torch

    data = pa.py_buffer(x.contiguous().view(-1).view(torch.uint8).numpy())
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, data])


def _one_half_list(x: torch.Tensor) -> pa.Array:
    """A one-row large_list<halffloat> over a bf16 tensor's bits: Parquet applies
    byte-stream-split only to fixed-width leaves, and bf16 has no Arrow type."""
    import torch

    n = x.numel()
    bits = pa.py_buffer(x.contiguous().view(-1).view(torch.uint8).numpy())
    values = pa.Array.from_buffers(pa.float16(), n, [None, bits])
    return pa.LargeListArray.from_arrays(pa.array([0, n], pa.int64()), values)


def _tensor_schema(*, hidden_as_list: bool) -> pa.Schema:
    hidden = pa.large_list(pa.float16()) if hidden_as_list else pa.large_binary()
    return pa.schema([("num_tokens", pa.int32()), ("input_ids", pa.large_binary()),
                      ("loss_mask", pa.large_binary())] + [(k, hidden) for k in HIDDEN_KEYS])


def _tensor_batch(s: Sample, schema: pa.Schema) -> pa.RecordBatch:
    hidden = _one_half_list if pa.types.is_large_list(schema.field(HIDDEN_KEYS[0]).type) else _one_value
    return pa.record_batch([pa.array([len(s.input_ids)], pa.int32()), _one_value(s.input_ids),
                            _one_value(s.loss_mask), hidden(s.aux_hidden_states),
                            hidden(s.last_hidden_state)], schema=schema)


def _ipc_writer(compression: str) -> Writer:
    def write(samples: Iterable[Sample], directory: Path, synth: SynthConfig) -> None:
        schema = _tensor_schema(hidden_as_list=False)
        options = ipc.IpcWriteOptions(compression=compression)
        with pa.OSFile(str(directory / "data.arrow"), "wb") as sink, \
                ipc.new_file(sink, schema, options=options) as writer:
            for sample in samples:  # one record batch per sample, as in the shipped format
                writer.write_batch(_tensor_batch(sample, schema))

    return write


def _parquet_writer(compression: str, *, byte_stream_split: bool) -> Writer:
    def write(samples: Iterable[Sample], directory: Path, synth: SynthConfig) -> None:
        schema = _tensor_schema(hidden_as_list=byte_stream_split)
        # No dictionaries and no min/max statistics of megabyte-sized values: both cost
        # CPU and buy nothing for tensors.
        options: dict = dict(compression=compression, use_dictionary=False, write_statistics=["num_tokens"])
        if byte_stream_split:  # on a list column the encoding must name the leaf, else it is ignored
            options["column_encoding"] = {f"{k}.list.element": "BYTE_STREAM_SPLIT" for k in HIDDEN_KEYS}
        with pq.ParquetWriter(str(directory / "data.parquet"), schema, **options) as writer:
            for sample in samples:  # one row group per sample, else random access reads many
                writer.write_batch(_tensor_batch(sample, schema))

    return write


def _per_sample_writer(save: Callable[[dict, Path], None], suffix: str) -> Writer:
    def write(samples: Iterable[Sample], directory: Path, synth: SynthConfig) -> None:
        for i, s in enumerate(samples):
            save({k: getattr(s, k) for k in TENSOR_KEYS}, directory / f"{i:06d}{suffix}")

    return write


def _torch_save(tensors: dict, path: Path) -> None:
    import torch

    torch.save(tensors, path)


def _safetensors_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


# --------------------------------------------------------------------------- readers


def _value_buffer(column: pa.Array | pa.ChunkedArray) -> pa.Buffer:
    """The single value of a one-row tensor column, as a slice of the column's own buffer.

    Not `column[0].as_buffer()`: pyarrow builds a binary Scalar from a copy of the value."""
    chunks = [c for c in column.chunks if len(c)] if isinstance(column, pa.ChunkedArray) else [column]
    if len(chunks) != 1 or len(chunks[0]) != 1:
        raise ValueError(f"expected one row in one chunk, got chunk lengths {[len(c) for c in chunks]}")
    array = chunks[0]
    if pa.types.is_large_list(array.type):
        values = array.flatten()
        width = values.type.byte_width
        return values.buffers()[1].slice(values.offset * width, len(values) * width)
    _, offsets, data = array.buffers()
    start, end = np.frombuffer(offsets, dtype=np.int64, count=2, offset=8 * array.offset)
    return data.slice(int(start), int(end - start))


def _decode_row(row: pa.RecordBatch | pa.Table, hidden_size: int) -> dict[str, torch.Tensor]:
    import torch

    t = row.column("num_tokens")[0].as_py()
    spec = {"input_ids": (torch.int32, (t,)), "loss_mask": (torch.uint8, (t,)),
            "aux_hidden_states": (torch.bfloat16, (t, 3, hidden_size)),
            "last_hidden_state": (torch.bfloat16, (t, hidden_size))}
    out = {}
    for name, (dtype, shape) in spec.items():
        buf = _value_buffer(row.column(name))
        if buf.size != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"column {name} holds {buf.size} bytes, expected shape {shape} {dtype}")
        out[name] = torch.frombuffer(memoryview(buf), dtype=dtype).view(shape)
    return out


class IpcFilesReader:
    """Memory-mapped Arrow IPC files, one record batch per sample; no copy where the
    batch is uncompressed."""

    def __init__(self, paths: Sequence[Path], hidden_size: int):
        self._files = [ipc.open_file(pa.memory_map(str(p))) for p in paths]
        self._starts = np.cumsum([0] + [f.num_record_batches for f in self._files]).tolist()
        self._hidden_size = hidden_size

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return _decode_row(self._files[k].get_batch(index - self._starts[k]), self._hidden_size)


class ParquetReader:
    """One memory-mapped Parquet file, one row group per sample."""

    def __init__(self, path: Path, hidden_size: int):
        self._file = pq.ParquetFile(str(path), memory_map=True)
        self._hidden_size = hidden_size

    def __len__(self) -> int:
        return self._file.num_row_groups

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _decode_row(self._file.read_row_group(index), self._hidden_size)


class PerSampleReader:
    """One file per sample, read with `load(path)`."""

    def __init__(self, directory: Path, suffix: str, load: Callable[[Path], Mapping[str, object]]):
        self._paths = sorted(directory.glob(f"*{suffix}"))
        self._load = load

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Mapping[str, object]:
        return self._load(self._paths[index])


def _open_shipped(directory: Path) -> Reader:
    from shared.shards import Dataset

    return Dataset(directory)


def _open_shipped_views(directory: Path) -> Reader:
    from shared.manifest import load_manifest

    manifest = load_manifest(directory)
    return IpcFilesReader([directory / s.file for s in manifest.shards], manifest.header.hidden_size)


def _hidden_size_of(directory: Path) -> int:
    return int((directory / "hidden_size").read_text())


def _torch_load(path: Path, *, mmap: bool) -> Mapping[str, object]:
    import torch

    return torch.load(path, mmap=mmap, weights_only=True)


def _safetensors_load(path: Path) -> Mapping[str, object]:
    from safetensors.torch import load_file

    return load_file(str(path))


_SHIPPED_LAYOUT = Layout(name="arrow-ipc", write=_write_shipped)
_TORCH_LAYOUT = Layout(name="torch-save", write=_per_sample_writer(_torch_save, ".pt"))

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(name=SHIPPED, label="Arrow IPC, uncompressed (shipped: shards.Dataset.stream, the epoch-streaming API)",
           layout=_SHIPPED_LAYOUT, open=_open_shipped, read=_by_stream),
    Format(name="arrow-ipc-getitem", label="same files through Dataset[i] in order (mmap, WILLNEED read-ahead)",
           layout=_SHIPPED_LAYOUT, open=_open_shipped),
    Format(name="arrow-ipc-views", label="same files, read as views of Array.buffers() (diagnostic)",
           layout=_SHIPPED_LAYOUT, open=_open_shipped_views),
    Format(name="arrow-ipc-lz4", label="Arrow IPC, lz4 frame, mmap",
           layout=Layout(name="arrow-ipc-lz4", write=_ipc_writer("lz4")),
           open=lambda d: IpcFilesReader([d / "data.arrow"], _hidden_size_of(d))),
    Format(name="arrow-ipc-zstd", label="Arrow IPC, zstd (level 1), mmap",
           layout=Layout(name="arrow-ipc-zstd", write=_ipc_writer("zstd")),
           open=lambda d: IpcFilesReader([d / "data.arrow"], _hidden_size_of(d))),
    Format(name="parquet", label="Parquet, uncompressed, row group per sample, mmap",
           layout=Layout(name="parquet", write=_parquet_writer("none", byte_stream_split=False)),
           open=lambda d: ParquetReader(d / "data.parquet", _hidden_size_of(d))),
    Format(name="parquet-zstd", label="Parquet, zstd (level 1)",
           layout=Layout(name="parquet-zstd", write=_parquet_writer("zstd", byte_stream_split=False)),
           open=lambda d: ParquetReader(d / "data.parquet", _hidden_size_of(d))),
    Format(name="parquet-bss-zstd", label="Parquet, byte-stream-split + zstd (level 1)",
           layout=Layout(name="parquet-bss-zstd", write=_parquet_writer("zstd", byte_stream_split=True)),
           open=lambda d: ParquetReader(d / "data.parquet", _hidden_size_of(d))),
    Format(name=BASELINE, label="torch.save per sample, torch.load (AngelSlim)",
           layout=_TORCH_LAYOUT, open=lambda d: PerSampleReader(d, ".pt", lambda p: _torch_load(p, mmap=False))),
    Format(name="torch-load-mmap", label="torch.save per sample, torch.load(mmap=True) (SpecForge)",
           layout=_TORCH_LAYOUT, open=lambda d: PerSampleReader(d, ".pt", lambda p: _torch_load(p, mmap=True))),
    Format(name="safetensors", label="safetensors per sample, load_file (speculators)",
           layout=Layout(name="safetensors", write=_per_sample_writer(_safetensors_save, ".safetensors")),
           open=lambda d: PerSampleReader(d, ".safetensors", _safetensors_load)),
)}


# --------------------------------------------------------------------------- measuring


class Touch:
    """Copies a sample's tensors into one reused buffer and returns the bytes copied."""

    def __init__(self, nbytes: int):
        import torch

        self.buffer = torch.ones(nbytes, dtype=torch.uint8)  # ones: fault every page in now

    def __call__(self, sample: Mapping[str, object]) -> int:
        n = 0
        for key in TENSOR_KEYS:
            flat = sample[key].reshape(-1).view(self.buffer.dtype)  # type: ignore[union-attr]
            self.buffer[: flat.numel()].copy_(flat)
            n += flat.numel()
        return n


class MemoryCopy:
    """The memory-copy limit, measured like a read: a source larger than the reads' working
    set, copied in the data set's tensor sizes into the reads' reused buffer."""

    def __init__(self, tensor_sizes: Sequence[int], touch: Touch, nbytes: int):
        import torch

        self._touch = touch
        self.source = torch.ones(nbytes, dtype=torch.uint8)
        self._pieces: list[tuple[int, int]] = []  # (offset, size), cycling through the tensor sizes
        offset = 0
        while True:
            for size in tensor_sizes:
                if offset + size > nbytes:
                    self.bytes = offset
                    return
                self._pieces.append((offset, size))
                offset += size

    def pass_mbps(self) -> float:
        buffer, source = self._touch.buffer, self.source
        start = time.perf_counter()
        for offset, size in self._pieces:
            buffer[:size].copy_(source[offset:offset + size])
        return self.bytes / (time.perf_counter() - start) / _MB

    def whole_buffer_mbps(self) -> float:
        """One copy into a second buffer as large as the source (no cache reuse at all)."""
        import torch

        target = torch.zeros_like(self.source)
        start = time.perf_counter()
        target.copy_(self.source)
        return self.source.numel() / (time.perf_counter() - start) / _MB


class DiskProbe:
    """Sequential O_DIRECT reads of a file written in this run: the disk's limit, no page
    cache. Each read fills the next of `buffers` buffers in turn (1: the same one every
    time, as `dd` does); `path` is written unless `write=False` (a second probe of the
    same file). With one buffer the file is read three times - in 4 MiB and in 16 MiB
    requests, and in 4 MiB requests two at a time (as the stream reads; on the VM this
    was built on each was the fastest at some time, the last when the disk's latency
    rose) - and the fastest counts."""

    def __init__(self, path: Path, nbytes: int, *, buffers: int = 1, write: bool = True):
        self.path, self.nbytes = path, nbytes
        # Page-aligned buffers (O_DIRECT needs alignment), faulted in now: fresh memory
        # right after a cache drop fills slower here and would be charged to the disk. In
        # huge pages, as the stream's buffers are: with 4 KiB pages the block layer cuts
        # each read into 0.5-1 MiB requests and the probe understated this disk by 1.1-1.5x.
        self._buffers = [direct_buffer(_DIRECT_CHUNK) for _ in range(buffers)]
        for buffer in self._buffers:
            buffer.write(b"\1" * _DIRECT_CHUNK)
        self.requests = (_DIRECT_CHUNK,) if buffers > 1 else (_PROBE_SMALL, _DIRECT_CHUNK)
        if not write:
            return
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:  # random bytes: nothing for a thin-provisioned disk to elide
            for _ in range(nbytes // _DIRECT_CHUNK):
                f.write(rng.bytes(_DIRECT_CHUNK))
            f.flush()
            os.fsync(f.fileno())

    def read_mbps(self) -> float:
        rates = [self._read_mbps(request) for request in self.requests]
        if len(self._buffers) == 1:
            rates.append(self._read_mbps(_PROBE_SMALL, in_flight=2))
        return max(rates)

    def _read_mbps(self, request: int, *, in_flight: int = 1) -> float:
        """Read the file once, `request` bytes a call; with `in_flight` threads taking turns
        (each into its own part of the buffer), as many requests are in flight at once."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            raise OSError(f"{self.path}: O_DIRECT open failed ({e}); put --dir on a real disk, not tmpfs") from None
        try:
            if in_flight > 1:
                views = [memoryview(self._buffers[0])[k * request:(k + 1) * request] for k in range(in_flight)]
                totals = [0] * in_flight

                def read(k: int) -> None:
                    offset = k * request
                    while n := os.preadv(fd, [views[k]], offset):
                        totals[k] += n
                        offset += in_flight * request

                threads = [threading.Thread(target=read, args=(k,)) for k in range(in_flight)]
                start = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                return sum(totals) / (time.perf_counter() - start) / _MB
            views = [memoryview(buffer)[:request] for buffer in self._buffers]
            start, total, turn = time.perf_counter(), 0, 0
            while n := os.readv(fd, [views[turn % len(views)]]):
                total += n
                turn += 1
            return total / (time.perf_counter() - start) / _MB
        finally:
            os.close(fd)


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _read_pass(fmt: Format, directory: Path, touch: Touch, indices: Iterable[int]) -> tuple[float, int]:
    """Seconds and bytes to open the format afresh and touch every tensor of `indices`."""
    start = time.perf_counter()
    reader = fmt.open(directory)
    nbytes = sum(touch(sample) for sample in fmt.read(reader, indices))
    return time.perf_counter() - start, nbytes


def _random_access(fmt: Format, directory: Path, touch: Touch, *, seconds: float, seed: int) -> tuple[float, float]:
    """(samples/s, MB/s) reading warm samples in a random order for about `seconds`."""
    reader = fmt.open(directory)
    rng = np.random.default_rng(seed)
    n = len(reader)
    count = nbytes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or count < min(n, 8):
        for i in rng.permutation(n)[: max(1, n // 4)]:
            nbytes += touch(reader[int(i)])
            count += 1
    elapsed = time.perf_counter() - start
    return count / elapsed, nbytes / elapsed / _MB


def _check_round_trip(fmt: Format, directory: Path, samples: Sequence[Sample]) -> None:
    """The reader must hand back the very bytes written (first and last sample)."""
    import torch

    reader = fmt.open(directory)
    if len(reader) != len(samples):
        raise RuntimeError(f"{fmt.name}: reader sees {len(reader)} samples, {len(samples)} were written")
    ends = sorted({0, len(samples) - 1})
    for i, streamed in zip(ends, fmt.read(reader, ends)):
        for got in (reader[i], streamed):
            for key in TENSOR_KEYS:
                want, have = getattr(samples[i], key), got[key]
                if have.dtype != want.dtype or have.shape != want.shape or not torch.equal(
                        have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                    raise RuntimeError(f"{fmt.name}: sample {i} field {key} does not read back as written "
                                       f"({tuple(have.shape)} {have.dtype} vs {tuple(want.shape)} {want.dtype})")


@dataclass(kw_only=True, slots=True)
class _Run:
    """What one run has measured so far."""

    memcpy_mbps: list[float] = field(default_factory=list)
    disk_mbps: list[float] = field(default_factory=list)
    spread_mbps: list[float] = field(default_factory=list)
    load_start: float = field(default_factory=lambda: os.getloadavg()[0])
    formats: dict[str, dict] = field(default_factory=dict)


def run_bench(config: BenchConfig) -> dict:
    """Generate, write every selected layout, measure it, and return the figures (see module doc)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="specmill-bench-", dir=config.directory))
    try:
        with warnings.catch_warnings():  # mapped buffers are read-only; the tensors are only read
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return _run(config, root)
    finally:
        torch.set_num_threads(threads)
        if config.keep:
            log.info("kept the layouts in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(config: BenchConfig, root: Path) -> dict:
    from tqdm import tqdm

    from shared.synth import synthetic_samples

    synth = config.synth()
    samples = list(tqdm(synthetic_samples(synth), total=synth.samples, desc="generate", unit="sample",
                        disable=not config.progress))
    sizes = [getattr(s, k).numel() * getattr(s, k).element_size() for s in samples for k in TENSOR_KEYS]
    data = {"samples": len(samples), "tokens": sum(len(s.input_ids) for s in samples),
            "tensor_bytes": sum(sizes), "hidden_size": synth.hidden_size, "dtype": synth.dtype}
    data["raw_bytes_per_token"] = data["tensor_bytes"] / data["tokens"]
    log.info("data: %d samples, %d tokens, %.0f MB of tensors (%.0f bytes/token raw)",
             data["samples"], data["tokens"], data["tensor_bytes"] / _MB, data["raw_bytes_per_token"])

    touch = Touch(max(sizes))
    memcpy = MemoryCopy(sizes, touch, min(1 << 30, max(64 << 20, data["tensor_bytes"])))
    probe = DiskProbe(root / "disk-probe.bin", config.disk_probe_bytes)
    spread = DiskProbe(probe.path, config.disk_probe_bytes, buffers=config.spread_buffers, write=False)
    run = _Run(disk_mbps=[probe.read_mbps()], spread_mbps=[spread.read_mbps()])
    log.info("limits: memory copy %.0f MB/s, disk %.0f MB/s, into %d buffers %.0f MB/s (first probes)",
             memcpy.pass_mbps(), run.disk_mbps[0], config.spread_buffers, run.spread_mbps[0])

    selected = config.selected()
    for layout in dict.fromkeys(f.layout for f in selected):
        formats = [f for f in selected if f.layout is layout]
        directory = root / layout.name
        written = _write_layout(layout, samples, directory, synth, data, config.progress)
        for fmt in formats:
            _check_round_trip(fmt, directory, samples)
        for fmt in formats:  # warm first: the files are still in the page cache from writing
            run.formats[fmt.name] = {"label": fmt.label, "layout": layout.name, **written,
                                     **_measure_warm(fmt, directory, touch, memcpy, run, config)}
        for fmt in formats:
            run.formats[fmt.name].update(_measure_cold(fmt, directory, touch, (probe, spread), run, config))
        if not config.keep:
            shutil.rmtree(directory)
    whole = memcpy.whole_buffer_mbps()
    del memcpy
    return _figures(config, data, run, whole)


def _write_layout(layout: Layout, samples: Sequence[Sample], directory: Path, synth: SynthConfig,
                  data: dict, progress: bool) -> dict:
    from tqdm import tqdm

    directory.mkdir()
    (directory / "hidden_size").write_text(str(synth.hidden_size))
    start = time.perf_counter()
    layout.write(tqdm(samples, desc=f"write {layout.name}", unit="sample", disable=not progress,
                      leave=False), directory, synth)
    os.sync()  # every layout pays for reaching the disk
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in directory.iterdir() if p.name != "hidden_size")
    figures = {"write_mbps": data["tensor_bytes"] / seconds / _MB, "bytes": nbytes,
               "bytes_per_token": nbytes / data["tokens"], "bytes_vs_raw": nbytes / data["tensor_bytes"]}
    log.info("%s: wrote %.0f MB at %.0f MB/s, %.3fx raw", layout.name, nbytes / _MB, figures["write_mbps"],
             figures["bytes_vs_raw"])
    return figures


def _measure_warm(fmt: Format, directory: Path, touch: Touch, memcpy: MemoryCopy, run: _Run,
                  config: BenchConfig) -> dict:
    passes, copies = [], []
    for _ in range(config.warm_passes):  # the limit, sampled right next to every read
        copies.append(memcpy.pass_mbps())
        seconds, nbytes = _read_pass(fmt, directory, touch, range(config.samples))
        passes.append(nbytes / seconds / _MB)
    run.memcpy_mbps += copies
    samples_per_s, random_mbps = _random_access(fmt, directory, touch, seconds=config.random_seconds,
                                                seed=config.seed)
    warm, copy = max(passes), max(copies)
    log.info("%s: warm %.0f MB/s (passes %s), memory copy %.0f MB/s: %.2fx; random %.1f samples/s", fmt.name,
             warm, " ".join(f"{p:.0f}" for p in passes), copy, warm / copy, samples_per_s)
    return {"warm_mbps": warm, "warm_passes_mbps": passes, "warm_memcpy_mbps": copy, "warm_vs_memcpy": warm / copy,
            "random_samples_per_s": samples_per_s, "random_mbps": random_mbps}


def _measure_cold(fmt: Format, directory: Path, touch: Touch, probes: tuple[DiskProbe, DiskProbe], run: _Run,
                  config: BenchConfig) -> dict:
    if not config.cold:
        return {"cold_mbps": None, "cold_disk_mbps": None, "cold_vs_disk": None, "cold_vs_disk_spread": None,
                "cold_rounds": []}
    probe, spread = probes
    rounds = []
    for _ in range(config.cold_passes):
        drop_page_cache()
        # O_DIRECT probes leave the page cache empty for the read; the spread ones sit nearer it.
        disk_before, spread_before = probe.read_mbps(), spread.read_mbps()
        seconds, nbytes = _read_pass(fmt, directory, touch, range(config.samples))
        spread_after, disk_after = spread.read_mbps(), probe.read_mbps()
        run.disk_mbps += [disk_before, disk_after]
        run.spread_mbps += [spread_before, spread_after]
        cold = nbytes / seconds / _MB
        disk, disk_spread = (disk_before + disk_after) / 2, (spread_before + spread_after) / 2
        rounds.append({"cold_mbps": cold, "disk_mbps": disk, "cold_vs_disk": cold / disk,
                       "disk_spread_mbps": disk_spread, "cold_vs_disk_spread": cold / disk_spread})
    # The median round by its ratio: the disk's own drift moves single rounds both ways.
    median = sorted(rounds, key=lambda r: r["cold_vs_disk"])[(len(rounds) - 1) // 2]
    log.info("%s: cold %.0f MB/s, disk %.0f MB/s (median of %d rounds; ratios %s): %.2fx", fmt.name,
             median["cold_mbps"], median["disk_mbps"], len(rounds),
             " ".join(f"{r['cold_vs_disk']:.2f}" for r in rounds), median["cold_vs_disk"])
    return {"cold_mbps": median["cold_mbps"], "cold_disk_mbps": median["disk_mbps"],
            "cold_vs_disk": median["cold_vs_disk"], "cold_vs_disk_spread": median["cold_vs_disk_spread"],
            "cold_rounds": rounds}


def _figures(config: BenchConfig, data: dict, run: _Run, whole_buffer_mbps: float) -> dict:
    limits = {
        "memcpy_mbps": statistics.median(run.memcpy_mbps),
        "memcpy_passes_mbps": run.memcpy_mbps,
        "memcpy_whole_buffer_mbps": whole_buffer_mbps,
        "disk_read_mbps": statistics.median(run.disk_mbps),
        "disk_probes_mbps": run.disk_mbps,
        "disk_spread_mbps": statistics.median(run.spread_mbps),
        "disk_spread_probes_mbps": run.spread_mbps,
        "disk_spread_buffers": config.spread_buffers,
    }
    # Other work on a 2-core machine slows the CPU-bound paths (decoding, copying) but not
    # an O_DIRECT read: the load says how far to trust a single run.
    machine = {"cpus": os.cpu_count(), "load_1min_start": run.load_start, "load_1min_end": os.getloadavg()[0]}
    figures = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
               "machine": machine, "data": data, "limits": limits, "formats": run.formats, "verdict": {}}
    shipped = run.formats.get(SHIPPED)
    if shipped is None:
        return figures
    baseline = run.formats.get(BASELINE)
    shipped["warm_read_ratio"] = shipped["warm_vs_memcpy"]
    shipped["cold_read_ratio"] = shipped["cold_vs_disk"]
    shipped["cold_read_ratio_spread"] = shipped["cold_vs_disk_spread"]
    shipped["speedup_vs_torch_save"] = shipped["warm_mbps"] / baseline["warm_mbps"] if baseline else None
    figures["verdict"] = {name: {"value": shipped[name], "goal": goal,
                                 "pass": None if shipped[name] is None else shipped[name] >= goal}
                          for name, goal in GOALS.items()}
    return figures


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch parent directory (default: the system temp dir); a fresh "
                             "directory is made inside and removed afterwards unless --keep")
    parser.add_argument("--samples", type=int, default=default["samples"], help="samples (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=default["hidden_size"],
                        help="hidden size H (default %(default)s)")
    parser.add_argument("--mean-tokens", type=int, default=default["mean_tokens"],
                        help="mean sequence length (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated subset of: {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip cold reads (they drop the page cache, which needs root)")
    parser.add_argument("--warm-passes", type=int, default=default["warm_passes"],
                        help="warm passes per format; the best counts (default %(default)s)")
    parser.add_argument("--cold-passes", type=int, default=default["cold_passes"],
                        help="cold rounds per format (drop caches, probe, read, probe); the median "
                             "ratio to the disk counts (default %(default)s)")
    parser.add_argument("--random-seconds", type=float, default=default["random_seconds"],
                        help="seconds of random access per format (default %(default)s)")
    parser.add_argument("--disk-probe-mb", type=int, default=default["disk_probe_bytes"] >> 20,
                        help="size of the O_DIRECT disk probe in MiB, a multiple of 16 (default %(default)s)")
    parser.add_argument("--spread-buffers", type=int, default=default["spread_buffers"],
                        help="buffers the second (diagnostic) disk probe rotates its 16 MiB reads over "
                             "(default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the written layouts")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a bar chart PNG here (default: the --json path with .png)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        config = BenchConfig(
            directory=args.dir, samples=args.samples, hidden_size=args.hidden, mean_tokens=args.mean_tokens,
            seed=args.seed, formats=tuple(f.strip() for f in args.formats.split(",")) if args.formats else (),
            cold=not args.no_cold, warm_passes=args.warm_passes, cold_passes=args.cold_passes,
            random_seconds=args.random_seconds,
            disk_probe_bytes=args.disk_probe_mb << 20, spread_buffers=args.spread_buffers, keep=args.keep,
        )
    except ValueError as e:
        print(f"specmill shards bench: {e}", file=sys.stderr)
        return 2
    figures = run_bench(config)
    print(format_report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures: {args.json}")
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json is not None else None)
    if plot_path is not None:
        plot(figures, plot_path)
        print(f"chart: {plot_path}")
    return 0


def format_report(figures: dict) -> str:
    limits = figures["limits"]
    data = figures["data"]
    header = (f"{'format':<18} {'write MB/s':>10} {'bytes/token':>11} {'x raw':>6} {'warm MB/s':>10} "
              f"{'x copy':>6} {'cold MB/s':>10} {'x disk':>6} {'random samples/s':>16}")
    lines = [f"{data['samples']} samples, {data['tokens']} tokens, H={data['hidden_size']} {data['dtype']}, "
             f"{data['tensor_bytes'] / _MB:.0f} MB of tensors, raw {data['raw_bytes_per_token']:.0f} bytes/token",
             "", header, "-" * len(header)]
    for name, f in figures["formats"].items():
        cold = "-" if f["cold_mbps"] is None else f"{f['cold_mbps']:.0f}"
        vs_disk = "-" if f["cold_vs_disk"] is None else f"{f['cold_vs_disk']:.2f}"
        lines.append(f"{name:<18} {f['write_mbps']:>10.0f} {f['bytes_per_token']:>11.0f} {f['bytes_vs_raw']:>6.3f} "
                     f"{f['warm_mbps']:>10.0f} {f['warm_vs_memcpy']:>6.2f} {cold:>10} {vs_disk:>6} "
                     f"{f['random_samples_per_s']:>16.1f}")
    disk, copies, machine = limits["disk_probes_mbps"], limits["memcpy_passes_mbps"], figures["machine"]
    lines += ["",
              f"memory copy limit  {limits['memcpy_mbps']:.0f} MB/s: single thread into the reads' buffer, median of "
              f"{len(copies)} passes ({min(copies):.0f}-{max(copies):.0f});",
              "                   each warm read ('x copy') is compared to the best of its own interleaved passes;",
              f"                   one whole-buffer copy for reference: {limits['memcpy_whole_buffer_mbps']:.0f} MB/s",
              f"disk read limit    {limits['disk_read_mbps']:.0f} MB/s: O_DIRECT into one buffer, 4 or 16 MiB requests "
              f"or 4 MiB two at a time (the fastest), median of {len(disk)} probes "
              f"({min(disk):.0f}-{max(disk):.0f});",
              "                   each cold read ('x disk') is compared to the mean of its own before/after probes",
              f"                   (median of {figures['config']['cold_passes']} such rounds per format)",
              f"disk, spread       {limits['disk_spread_mbps']:.0f} MB/s: 16 MiB reads rotated over "
              f"{limits['disk_spread_buffers']} buffers (what a zero-copy read-ahead lands in), median of "
              f"{len(limits['disk_spread_probes_mbps'])} probes",
              f"machine            {machine['cpus']} CPUs, 1-minute load {machine['load_1min_start']:.1f} at the "
              f"start, {machine['load_1min_end']:.1f} at the end (other work slows CPU-bound reads)"]
    if figures["verdict"]:
        lines += ["", f"shipped format ({SHIPPED}):"]
        for name, v in figures["verdict"].items():
            value = "n/a" if v["value"] is None else f"{v['value']:.2f}"
            status = "n/a" if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
            lines.append(f"  {name:<22} {value:>5}  (goal >= {v['goal']:.1f})  {status}")
    lines += ["", "formats:"] + [f"  {name:<18} {f['label']}" for name, f in figures["formats"].items()]
    return "\n".join(lines)


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures["formats"])
    warm = [figures["formats"][n]["warm_mbps"] for n in names]
    cold = [figures["formats"][n]["cold_mbps"] or 0.0 for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(names)), 5))
    ax.bar(x - 0.2, warm, 0.4, label="warm (page cache)")
    ax.bar(x + 0.2, cold, 0.4, label="cold (after drop_caches)")
    limits = figures["limits"]
    ax.axhline(limits["memcpy_mbps"], color="C0", linestyle="--", label="memory copy limit")
    ax.axhline(limits["disk_read_mbps"], color="C1", linestyle="--", label="disk limit (O_DIRECT, median)")
    ax.axhline(limits["disk_spread_mbps"], color="C1", linestyle=":",
               label=f"disk into {limits['disk_spread_buffers']} buffers (median)")
    ax.set_ylim(0, 1.3 * max(warm + cold + [limits["memcpy_mbps"], limits["disk_read_mbps"]]))  # room for the legend
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("MB/s until the torch tensors are in hand")
    ax.set_title(f"specmill shards bench: {figures['data']['samples']} samples, H={figures['data']['hidden_size']}")
    ax.legend(fontsize="small", ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
