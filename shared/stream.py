"""Streaming a shard data set in a given order, reading ahead in background threads.

Why a second read path next to `Dataset[i]`: on a cold page cache, reads through a memory
map (or plain `read()`) ran at about half of what the disk gives an O_DIRECT reader on
the machines this was built on (`specmill shards bench`). So a stream reads every sample
that is not already in the page cache with O_DIRECT: the record batch's whole byte range
(neighbouring samples of one shard coalesced into one request of up to `max_request`
bytes) lands in a fresh page-aligned buffer, and the tensors handed out are views of it.
Samples already in the page cache (`mincore`) are read through the memory map, as
`Dataset[i]` does: O_DIRECT would go back to the disk for them.

O_DIRECT is detected per shard file, not assumed: where the filesystem refuses it (tmpfs,
some network filesystems) the stream reads through the map, with kernel read-ahead.
O_DIRECT reads bypass the page cache, so an epoch streamed cold leaves nothing cached;
for data sets far larger than memory (the usual case) the cache would not have helped.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

if TYPE_CHECKING:
    from shared.shards import Dataset

log = logging.getLogger("specmill.shards")

# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block size:
# 4096 covers both 512-byte and 4K devices, and mmap'd buffers are page aligned.
DIRECT_ALIGN = 4096
_ARROW_MAGIC = b"ARROW1"


@dataclass(frozen=True, slots=True)
class Block:
    """Where one record batch lies in an Arrow IPC file: its message metadata, then its body."""

    offset: int
    metadata_length: int
    body_length: int

    @property
    def end(self) -> int:
        return self.offset + self.metadata_length + self.body_length


class FooterError(ValueError):
    pass


def record_batch_blocks(tail: memoryview | bytes) -> list[Block]:
    """The record-batch blocks listed in an Arrow IPC file's footer.

    `tail` is the file (or its end, as long as it holds the whole footer). pyarrow does not
    expose block offsets; the footer is a flatbuffer `Footer { version, schema,
    dictionaries, recordBatches: [Block] }` followed by its int32 length and "ARROW1", and
    `Block` is a 24-byte struct { offset: int64, metaDataLength: int32, pad, bodyLength: int64 }.
    """
    if len(tail) < 10 or bytes(tail[-6:]) != _ARROW_MAGIC:
        raise FooterError("no Arrow IPC file footer (file truncated?)")
    (footer_length,) = struct.unpack_from("<i", tail, len(tail) - 10)
    start = len(tail) - 10 - footer_length
    if footer_length <= 0 or start < 0:
        raise FooterError(f"footer length {footer_length} does not fit the file")
    footer = memoryview(tail)[start:len(tail) - 10]
    try:
        (table,) = struct.unpack_from("<I", footer, 0)
        (vtable_back,) = struct.unpack_from("<i", footer, table)
        vtable = table - vtable_back
        (vtable_length,) = struct.unpack_from("<H", footer, vtable)
        slot = 4 + 2 * 3  # field 3: recordBatches
        field = struct.unpack_from("<H", footer, vtable + slot)[0] if slot < vtable_length else 0
        if field == 0:
            return []
        vector = table + field + struct.unpack_from("<I", footer, table + field)[0]
        (count,) = struct.unpack_from("<I", footer, vector)
        return [Block(*struct.unpack_from("<qi4xq", footer, vector + 4 + 24 * i)) for i in range(count)]
    except struct.error as e:
        raise FooterError(f"footer is malformed ({e})") from None


def open_direct(path: str | os.PathLike) -> int | None:
    """A file descriptor for O_DIRECT reads, or None where the filesystem refuses them."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        log.info("%s: O_DIRECT refused (%s); streaming through the page cache", path, e.strerror)
        return None


def read_direct(fd: int, start: int, end: int) -> mmap.mmap:
    """Bytes [start, end) of the file read with O_DIRECT into a fresh page-aligned buffer
    that begins at `start` rounded down to DIRECT_ALIGN."""
    first = start - start % DIRECT_ALIGN
    length = -(-(end - first) // DIRECT_ALIGN) * DIRECT_ALIGN
    buffer = mmap.mmap(-1, length)
    done = 0
    view = memoryview(buffer)
    try:
        while done < end - first:
            n = os.preadv(fd, [view[done:]], first + done)  # releases the GIL
            if n == 0:
                raise EOFError(f"file ends at {first + done}, needed bytes up to {end}")
            done += n
    finally:
        view.release()
    return buffer


class _Residency:
    """`mincore`: which pages of a mapping the page cache holds."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._mincore.restype = ctypes.c_int

    def all_cached(self, address: int, length: int) -> bool:
        first = address - address % mmap.PAGESIZE
        pages = -(-(address + length - first) // mmap.PAGESIZE)
        vector = np.empty(pages, dtype=np.uint8)
        if self._mincore(first, pages * mmap.PAGESIZE, vector.ctypes.data) != 0:
            return False  # cannot tell: read it as if cold
        return bool(np.all(vector & 1))


_residency: _Residency | None = None


def residency() -> _Residency:
    global _residency
    if _residency is None:
        _residency = _Residency()
    return _residency


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True, slots=True)
class _Slot:
    """The next sample(s) in stream order: already being read (future) or read on demand."""

    indices: tuple[int, ...]
    nbytes: int
    future: Future | None = None
    advise: bool = False  # read through the map: ask the kernel to read ahead


class SampleStream:
    """Samples of `ds` in the order of `indices`, as dicts like `ds[i]`, read ahead by up
    to `readahead_bytes` in `threads` background threads. Iterate it once; `close()` (or
    leaving a `with` block) stops the threads. Tensors from O_DIRECT reads are views of
    private buffers that live as long as the tensors do."""

    def __init__(self, ds: Dataset, indices: Iterable[int], *, direct: bool, readahead_bytes: int,
                 threads: int, max_request: int):
        if readahead_bytes <= 0 or threads <= 0 or max_request <= 0:
            raise ValueError(f"stream: readahead_bytes, threads and max_request must be positive, got "
                             f"{readahead_bytes}, {threads}, {max_request}")
        self._ds = ds
        self._indices = iter(int(i) for i in indices)
        self._peeked: int | None = None
        self._direct = direct
        self._readahead = readahead_bytes
        self._max_request = max_request
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="specmill-stream")
        self._slots: collections.deque[_Slot] = collections.deque()
        self._in_flight = 0
        self._ready: collections.deque[dict] = collections.deque()
        self._exhausted = False

    def __iter__(self) -> Iterator[dict[str, object]]:
        return self

    def __next__(self) -> dict[str, object]:
        if not self._ready:
            self._fill()
            if not self._slots:
                self.close()
                raise StopIteration
            slot = self._slots.popleft()
            self._in_flight -= slot.nbytes
            if slot.future is not None:
                self._ready.extend(slot.future.result())
            else:
                self._ready.append(self._ds._get(slot.indices[0], readahead=slot.advise))
            self._fill()
        return self._ready.popleft()

    def close(self) -> None:
        self._exhausted = True
        for slot in self._slots:
            if slot.future is not None:
                slot.future.cancel()
        self._slots.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SampleStream:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- read-ahead

    def _next_index(self) -> int | None:
        if self._peeked is not None:
            index, self._peeked = self._peeked, None
            return index
        return next(self._indices, None)

    def _fill(self) -> None:
        while not self._exhausted and (self._in_flight < self._readahead or not self._slots):
            index = self._next_index()
            if index is None:
                self._exhausted = True
                return
            slot = self._plan(index)
            self._slots.append(slot)
            self._in_flight += slot.nbytes

    def _plan(self, index: int) -> _Slot:
        """One slot for `index`, grown by the following indices while they are the next
        record batches of the same shard (one read request for all of them)."""
        ds = self._ds
        shard, row = ds._locate(index)
        source = ds._shard(shard)
        if source.remote:  # object stores are latency-bound: fetch in the pool too
            return _Slot(indices=(index,), nbytes=source.sample_bytes(row),
                         future=self._pool.submit(lambda: [ds._get(index, readahead=False)]))
        blocks = source.blocks()
        nbytes = blocks[row].end - blocks[row].offset
        if source.cached(blocks[row]):
            return _Slot(indices=(index,), nbytes=nbytes, advise=False)
        if not self._direct or source.direct_fd() is None:
            return _Slot(indices=(index,), nbytes=nbytes, advise=True)
        rows, start, end = [row], blocks[row].offset, blocks[row].end
        indices = [index]
        while end - start < self._max_request:
            following = next(self._indices, None)
            if following is None:
                break
            k, r = ds._locate(following)
            if k != shard or r != rows[-1] + 1 or blocks[r].offset != end or source.cached(blocks[r]):
                self._peeked = following
                break
            rows.append(r)
            indices.append(following)
            end = blocks[r].end
        future = self._pool.submit(ds._read_direct, shard, rows, indices)
        return _Slot(indices=tuple(indices), nbytes=end - start, future=future)
