"""Streaming a shard data set in a given order, reading ahead in background threads.

Why a second read path next to `Dataset[i]`: on a cold page cache, reads through a memory
map (or plain `read()`) ran at about half of what the disk gives an O_DIRECT reader on
the machines this was built on (`specmill shards bench`). So a stream reads every sample
that is not already in the page cache with O_DIRECT: the record batch's whole byte range
(neighbouring samples of one shard coalesced into one range of up to `max_request` bytes)
is read in order, 4 MiB at a time by two threads, into a few small landing buffers in
huge pages, and copied out into a buffer reused from a pool (`LandingReader` and `BufferPool`
say why); the tensors handed out are views of that buffer.
Samples already in the page cache (`mincore`) are read through the memory map, as
`Dataset[i]` does (O_DIRECT would go back to the disk for them), with a pool thread
mapping their pages in (MADV_POPULATE_READ) and decoding them ahead of the consumer: on a
fresh map the page faults cost about a third of a warm read, the decode a twentieth, and
this moves both to another core, where they overlap the consumer's own copying.

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
import queue
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from shared.sample_codec import Block

log = logging.getLogger("specmill.shards")

# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block size:
# 4096 covers both 512-byte and 4K devices, and mmap'd buffers are page aligned.
DIRECT_ALIGN = 4096
_MADV_POPULATE_READ = 22  # Linux 5.14+, not in Python 3.11's mmap module
_MADV_POPULATE_WRITE = 23
_POPULATE_STEP = 4 << 20
_HUGE_PAGE = 2 << 20


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


class BufferPool:
    """Page-aligned buffers that streamed samples live in, recycled once the last tensor
    viewing one is gone.

    Fresh 4 KiB pages fault in at 0.45-0.9 GB/s on the VMs this was built on, less than the
    disk (huge pages: 1.7-2.2 GB/s), so buffers are reused rather than mapped per range,
    and are made of huge pages (`direct_buffer`) like the landing buffers, where that
    matters more: in 4 KiB pages a buffer is physically scattered, and the block layer cuts
    an O_DIRECT read into requests of at most `max_segments` pages (254 here: 0.5-1 MiB
    requests, 1.3-1.8 GB/s); in transparent huge pages (2 MiB, `MADV_HUGEPAGE`) a request
    grows to the device's `max_sectors_kb` (4 MiB here: 2.5-2.8 GB/s, the same disk, the
    same minute). Measured on a dropped cache; README "Shard storage".
    Private, not shared anonymous memory: a forked loader worker inherits the free list,
    and with shared pages it would read into the very buffers its parent hands out.
    One pool per process: a trainer streams epoch after epoch from one data set, and the
    buffers outlive each stream.
    """

    def __init__(self, *, keep_bytes: int = 512 << 20):
        self.keep_bytes = keep_bytes
        self._free: list[mmap.mmap] = []
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._returned: collections.deque[mmap.mmap] = collections.deque()  # freed while the lock was held

    def acquire(self, nbytes: int, *, exact: bool = False) -> np.ndarray:
        """A uint8 array of at least `nbytes` over a page-aligned buffer; the buffer returns
        to the pool when this array (and everything viewing it) is garbage. `exact`: a
        buffer of `nbytes` rounded up to whole huge pages only (a landing buffer: small on
        purpose), not one of the pool's common sizes."""
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE if exact else _pool_size(nbytes)
        with self._lock:
            while self._returned:
                self._keep(self._returned.popleft())
            fits = [m for m in self._free if (len(m) == size if exact else len(m) >= size)]
            buffer = min(fits, key=len) if fits else None
            if buffer is not None:
                self._free.remove(buffer)
                self._free_bytes -= len(buffer)
        if buffer is None:
            buffer = direct_buffer(size)
        array = np.frombuffer(buffer, dtype=np.uint8)
        weakref.finalize(array, self._release, buffer)
        return array

    def _release(self, buffer: mmap.mmap) -> None:
        """A finalizer: it runs in whichever thread drops the last view, at any allocation
        when a garbage collection frees it - also inside `acquire`, lock held (a stream's
        copy thread deadlocked on itself so). So it never waits for the lock: if the lock
        is busy, the buffer is filed by the next `acquire`."""
        if not self._lock.acquire(blocking=False):
            self._returned.append(buffer)
            return
        try:
            self._keep(buffer)
        finally:
            self._lock.release()

    def _keep(self, buffer: mmap.mmap) -> None:  # lock held
        if self._free_bytes + len(buffer) <= self.keep_bytes:
            self._free.append(buffer)
            self._free_bytes += len(buffer)


_POOL_MIN = 18 << 20  # a default max_request (16 MiB) aligned at both ends, in whole huge pages


def _pool_size(nbytes: int) -> int:
    """Few distinct sizes, so that buffers get reused: one for every request up to the
    default max_request, powers of two above (a single sample larger than that); all
    whole huge pages, which the kernel then aligns to 2 MiB."""
    return _POOL_MIN if nbytes <= _POOL_MIN else 1 << (nbytes - 1).bit_length()


def direct_buffer(size: int) -> mmap.mmap:
    """A private anonymous buffer of `size` bytes for O_DIRECT reads, backed by transparent
    huge pages where the kernel has them, its pages faulted in now (by the thread that is
    about to read into it, so while other threads' reads are in flight)."""
    global _huge_pages_refused
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if not _huge_pages_refused:
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError) as e:  # a kernel without transparent huge pages
            _huge_pages_refused = True
            log.info("MADV_HUGEPAGE refused (%s): O_DIRECT buffers use 4 KiB pages, cold reads run slower", e)
    residency().populate_write(np.frombuffer(buffer, dtype=np.uint8).ctypes.data, size)
    return buffer


_huge_pages_refused = False
POOL = BufferPool()


class LandingReader:
    """O_DIRECT reads of whole byte ranges, in the order submitted, through a few small
    landing buffers: `readers` threads read the ranges' `chunk`-byte pieces in file order,
    each into the next free landing buffer, and one more thread copies each piece out into
    its range's buffer from POOL.

    Why not read straight into the buffers handed out (zero-copy, as this did before): on
    the VM this was built on, the disk delivers less the more distinct memory its reads
    land in - into one 4-16 MiB buffer 2.2-3.0 GB/s, into 32 MiB or more 1.8-1.9 GB/s,
    whatever the request size (README "Shard storage") - and a zero-copy stream holds
    several 16 MiB buffers (in flight, queued, held by the consumer). Landing in three
    4 MiB buffers and copying out (a memory copy runs at 3-4x the disk's rate, on the
    second core) kept the reads near the one-buffer rate. Two readers, because one 4 MiB
    read at a time left the disk idle between requests when its latency rose (0.77 of the
    disk against 0.83-0.90 for two readers, same minutes; a fourth landing buffer, or a
    third reader with it, did no better).
    """

    def __init__(self, *, chunk: int = 4 << 20, readers: int = 2, landing: int = 3):
        if chunk <= 0 or chunk % DIRECT_ALIGN or readers < 1 or landing <= readers:
            raise ValueError(f"LandingReader: chunk must be a positive multiple of {DIRECT_ALIGN}, readers at "
                             f"least 1 and landing more than readers; got {chunk}, {readers}, {landing}")
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        filled: queue.SimpleQueue = queue.SimpleQueue()
        free: queue.SimpleQueue = queue.SimpleQueue()
        pieces = _Pieces(self._requests, chunk)
        # The threads see the queues, not self: a stream dropped unclosed still ends them.
        self._threads = [threading.Thread(target=_read_pieces, args=(pieces, free, filled),
                                          name="specmill-read", daemon=True) for _ in range(readers)]
        self._threads.append(threading.Thread(target=_copy_pieces, args=(filled, free, readers, chunk, landing),
                                              name="specmill-copy", daemon=True))
        for thread in self._threads:
            thread.start()
        self._stop = weakref.finalize(self, self._requests.put, None)

    def submit(self, fd: int, start: int, end: int) -> Future:
        """A future of bytes [start, end) of the file: a uint8 array from POOL whose first
        byte is file byte `start` rounded down to DIRECT_ALIGN (OSError or EOFError if the
        read fails). Cancel it to skip a range not yet being read."""
        future: Future = Future()
        self._requests.put((future, fd, start, end))
        return future

    def close(self) -> None:
        """Stop once the ranges already submitted are read (or cancelled)."""
        self._stop()
        for thread in self._threads:
            thread.join()


@dataclass(slots=True)
class _Range:
    """One submitted range on its way through LandingReader."""

    future: Future
    fd: int
    first: int  # file offset of byte 0 of the range's buffer (start rounded down)
    end: int
    length: int  # of the buffer: end - first rounded up to DIRECT_ALIGN
    left: int  # bytes not yet copied out
    target: np.ndarray | None = None
    failed: bool = False


class _Pieces:
    """The pieces of the submitted ranges, handed out in file order to the reading threads."""

    def __init__(self, requests: queue.SimpleQueue, chunk: int):
        self._requests, self.chunk = requests, chunk
        self._lock = threading.Lock()
        self._range: _Range | None = None
        self._next = 0  # offset of the next piece in self._range
        self._stopped = False

    def take(self) -> tuple[_Range, int, int] | None:
        """(range, offset in its buffer, bytes to read) of the next piece; None once stopped."""
        with self._lock:
            while self._range is None or self._range.failed or self._next >= self._range.end - self._range.first:
                if self._stopped:
                    return None
                request = self._requests.get()
                if request is None:
                    self._stopped = True
                    return None
                future, fd, start, end = request
                if not future.set_running_or_notify_cancel():
                    continue
                first = start - start % DIRECT_ALIGN
                length = -(-(end - first) // DIRECT_ALIGN) * DIRECT_ALIGN
                self._range, self._next = _Range(future, fd, first, end, length, left=end - first), 0
            part, offset = self._range, self._next
            self._next += self.chunk
            return part, offset, min(self.chunk, part.end - part.first - offset)


def _read_pieces(pieces: _Pieces, free: queue.SimpleQueue, filled: queue.SimpleQueue) -> None:
    """A LandingReader reading thread: the next piece into the next free landing buffer."""
    while True:
        landing = free.get()
        piece = pieces.take()
        if piece is None:
            free.put(landing)
            filled.put(None)
            return
        part, offset, need = piece
        if isinstance(landing, OSError):  # no memory for landing buffers: every range fails with that
            filled.put((part, offset, landing, 0, landing))
            continue
        got, error = 0, None
        try:
            want = min(pieces.chunk, part.length - offset)  # whole blocks: O_DIRECT reads no less
            while got < need:
                n = os.preadv(part.fd, [memoryview(landing)[got:want]], part.first + offset + got)  # GIL released
                if n == 0:
                    raise EOFError(f"file ends at {os.fstat(part.fd).st_size}, needed bytes up to {part.end}")
                got += n
        except (OSError, EOFError) as e:
            error = e
        filled.put((part, offset, landing, min(got, need), error))


def _copy_pieces(filled: queue.SimpleQueue, free: queue.SimpleQueue, readers: int, chunk: int,
                 landing: int) -> None:
    """LandingReader's copying thread: first the landing buffers (from POOL, where the
    last reader left them: fresh ones fault in at 0.4-0.9 GB/s on the VMs this was built
    on, 13-30 ms for three, which the stream's consumer should not wait for), then pieces
    out of them into their ranges' buffers. The landing buffers go back to POOL when the
    threads are done with the queues. If they cannot be had, the error stands in for
    them, so that every range fails with it rather than waiting forever."""
    for _ in range(landing):
        try:
            free.put(POOL.acquire(chunk, exact=True))
        except OSError as e:
            free.put(e)
    ended = 0
    while ended < readers:
        item = filled.get()
        if item is None:
            ended += 1
            continue
        part, offset, landing, got, error = item
        if not part.failed:
            try:
                if error is None:
                    if part.target is None:
                        part.target = POOL.acquire(part.length)
                    np.copyto(part.target[offset:offset + got], landing[:got])  # GIL released
            except Exception as e:  # noqa: BLE001 - handed to whoever waits for the range
                error = e
            if error is not None:
                part.failed = True
                part.target = None
                part.future.set_exception(error)
            else:
                part.left -= got
                if part.left == 0:
                    part.future.set_result(part.target)
                    part.target = None
        free.put(landing)


class _Residency:
    """`mincore`: whether the page cache holds a page of a mapping."""

    _PROBES = 4

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._mincore.restype = ctypes.c_int
        self._madvise = libc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._madvise.restype = ctypes.c_int
        self._populate_ok = True
        self._populate_write_ok = True
        self._local = threading.local()

    def probably_cached(self, address: int, length: int) -> bool:
        """Whether a few pages spread over [address, address + length) - first, last and
        between - are all cached. Not every page: mincore costs ~0.14 us a page, a third
        of what reading the page from the cache costs. Eviction and read-ahead work on
        runs of pages, so a sample is rarely half cached, and a wrong guess costs speed,
        never correctness (the map path faults in what is missing)."""
        vector = getattr(self._local, "vector", None)
        if vector is None:
            vector = self._local.vector = ctypes.create_string_buffer(1)
        first = address - address % mmap.PAGESIZE
        pages = (address + length - 1 - first) // mmap.PAGESIZE + 1
        probes = {(pages - 1) * k // (self._PROBES - 1) for k in range(self._PROBES)}
        return all(self._page_cached(first + p * mmap.PAGESIZE, vector) for p in sorted(probes))

    @property
    def can_populate(self) -> bool:
        return self._populate_ok

    def populate(self, address: int, length: int) -> None:
        """Map the cached pages of a range into the page table now (MADV_POPULATE_READ,
        Linux 5.14+), through ctypes so that the GIL is released meanwhile."""
        first = address - address % mmap.PAGESIZE
        if self._populate_ok and self._madvise(first, address + length - first, _MADV_POPULATE_READ) != 0:
            self._populate_ok = False  # an older kernel: the consumer faults the pages in
            log.info("MADV_POPULATE_READ refused (errno %d): warm stream reads fault pages in", ctypes.get_errno())

    def populate_write(self, address: int, length: int) -> None:
        """Fault a fresh anonymous range in now (MADV_POPULATE_WRITE, Linux 5.14+), GIL released.
        In 4 MiB steps: fresh memory fills at ~0.4 GB/s on the VMs this was built on, and a
        call holds the process's mmap lock, which every other thread's mmap, munmap and
        madvise waits for (a 64 MiB buffer held the consumer's shard open for 169 ms)."""
        for step in range(address, address + length, _POPULATE_STEP):
            if not self._populate_write_ok:
                return
            if self._madvise(step, min(_POPULATE_STEP, address + length - step), _MADV_POPULATE_WRITE) != 0:
                self._populate_write_ok = False  # an older kernel: the first write into a buffer faults it in
                log.info("MADV_POPULATE_WRITE refused (errno %d): fresh buffers fault in when first written",
                         ctypes.get_errno())

    def _page_cached(self, page: int, vector) -> bool:
        return self._mincore(page, mmap.PAGESIZE, vector) == 0 and bool(vector.raw[0] & 1)


_residency: _Residency | None = None


def residency() -> _Residency:
    global _residency
    if _residency is None:
        _residency = _Residency()
    return _residency


# --------------------------------------------------------------------------- the stream


class ShardFile(Protocol):
    """A local shard file, as the stream plans its reads."""

    def blocks(self) -> list[Block]:
        """Where each row's record batch lies in the file."""

    def cached(self, block: Block) -> bool:
        """Whether the page cache (probably) holds the block's bytes."""

    def address(self, offset: int) -> int:
        """Where file byte `offset` lies in this process's memory map of the file."""

    def direct_fd(self) -> int | None:
        """A descriptor for O_DIRECT reads (`open_direct`), None where the filesystem refuses them."""


class StreamSource(Protocol):
    """What a SampleStream reads, in the data set's terms; shared.shards.Dataset is one.

    The stream decides what to read when, and how (the map, O_DIRECT or the source's own
    `get`); the source says where samples lie and decodes the bytes the stream got."""

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row in the shard) of sample `index`."""

    def shard_file(self, shard: int) -> ShardFile | None:
        """The local file of `shard`; None when the shard is not local (read its samples with `get`)."""

    def sample_bytes(self, index: int) -> int:
        """Bytes of sample `index` (an estimate where the shard is not local), for the read-ahead budget."""

    def get(self, index: int, *, readahead: bool) -> dict[str, object]:
        """Sample `index`, as `ds[index]`; `readahead`: ask the kernel for its bytes first."""

    def decode_mapped(self, shard: int, rows: Sequence[int], indices: Sequence[int]) -> list[dict[str, object]]:
        """Samples `indices`, rows `rows` of a local shard, decoded from its memory map."""

    def decode_read(self, shard: int, rows: Sequence[int], indices: Sequence[int],
                    read: Future) -> list[dict[str, object]]:
        """Samples `indices`, consecutive rows `rows` of a local shard, decoded from their
        O_DIRECT read: `read` (LandingReader.submit) gives the bytes from the first row's
        block on, starting at its offset rounded down to DIRECT_ALIGN."""


@dataclass(frozen=True, slots=True)
class _Slot:
    """The next sample(s) in stream order: already being read (future) or read on demand."""

    indices: tuple[int, ...]
    nbytes: int
    future: Future | None = None
    advise: bool = False  # read through the map: ask the kernel to read ahead
    data: Future | None = None  # the O_DIRECT read that `future` decodes


def _map_in(ds: StreamSource, shard: int, rows: list[int], indices: list[int], address: int, length: int,
            populate: bool) -> list[dict[str, object]]:
    """Cached consecutive rows of a shard: their pages mapped in, then decoded from the map."""
    if populate:
        residency().populate(address, length)
    return ds.decode_mapped(shard, rows, indices)


class SampleStream:
    """Samples of `ds` in the order of `indices`, as dicts like `ds[i]`, read ahead by up
    to `readahead_bytes` in `threads` background threads. Iterate it once; `close()` (or
    leaving a `with` block) stops the threads. Tensors from O_DIRECT reads are views of
    private buffers that live as long as the tensors do."""

    def __init__(self, ds: StreamSource, indices: Iterable[int], *, direct: bool, readahead_bytes: int,
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
        self._populate = residency().can_populate
        self._reader: LandingReader | None = None  # started with the first O_DIRECT read

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
                self._ready.extend(self._ds.get(i, readahead=slot.advise) for i in slot.indices)
            self._fill()
        return self._ready.popleft()

    def close(self) -> None:
        self._exhausted = True
        for slot in self._slots:
            for future in (slot.data, slot.future):
                if future is not None:
                    future.cancel()
        self._slots.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

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
        record batches of the same shard, cached alike (one request, or one populate
        job, for all of them: a job handed to the pool costs ~50 us of the consumer's
        time, 10% of a warm 8 MB sample)."""
        ds = self._ds
        shard, row = ds.locate(index)
        source = ds.shard_file(shard)
        if source is None:  # object stores are latency-bound: fetch in the pool too
            return _Slot(indices=(index,), nbytes=ds.sample_bytes(index),
                         future=self._pool.submit(lambda: [ds.get(index, readahead=False)]))
        blocks = source.blocks()
        cached = source.cached(blocks[row])
        if not cached and (not self._direct or source.direct_fd() is None):
            return _Slot(indices=(index,), nbytes=blocks[row].end - blocks[row].offset, advise=True)
        rows, start, end = [row], blocks[row].offset, blocks[row].end
        indices = [index]
        # Read requests stay within max_request, so the pool's buffers have one common size;
        # mapped runs have no buffer and may be longer.
        limit = max(self._max_request, self._readahead // 2) if cached else self._max_request
        while True:
            following = next(self._indices, None)
            if following is None:
                break
            k, r = ds.locate(following)
            if (k != shard or r != rows[-1] + 1 or blocks[r].offset != end
                    or blocks[r].end - start > limit or source.cached(blocks[r]) != cached):
                self._peeked = following
                break
            rows.append(r)
            indices.append(following)
            end = blocks[r].end
        if cached:
            # Read through the map: a pool thread maps the pages in and decodes the samples
            # ahead of the consumer (page faults cost a third of a warm read, the decode a
            # twentieth; both run on another core while the consumer copies).
            future = self._pool.submit(_map_in, ds, shard, rows, indices, source.address(start), end - start,
                                       self._populate)
            return _Slot(indices=tuple(indices), nbytes=end - start, future=future)
        if self._reader is None:
            self._reader = LandingReader()
        data = self._reader.submit(source.direct_fd(), start, end)
        future = self._pool.submit(ds.decode_read, shard, rows, indices, data)  # decoded off the consumer
        return _Slot(indices=tuple(indices), nbytes=end - start, future=future, data=data)
