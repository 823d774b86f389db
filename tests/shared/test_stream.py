"""`Dataset.stream`: O_DIRECT read-ahead for cold samples, the map for cached ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from shared.manifest import load_manifest
from shared.sample_codec import record_batch_blocks
from shared.shards import Dataset, ShardError
from shared.stream import open_direct
from shared.synth import SynthConfig, write_synthetic

from machine import thp_mode
from page_cache import cached_fraction, evict, o_direct_works

CONFIG = SynthConfig(samples=40, hidden_size=128, mean_tokens=64, max_tokens=300, vocab=1000,
                     shard_bytes=512 << 10)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "ds"
    write_synthetic(out, CONFIG)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_footer_blocks_locate_every_record_batch(ds_dir):
    for info in load_manifest(ds_dir).shards:
        data = (ds_dir / info.file).read_bytes()
        reader = ipc.open_file(pa.py_buffer(data))
        blocks = record_batch_blocks(data)
        assert len(blocks) == reader.num_record_batches == info.rows
        for i, block in enumerate(blocks):
            message = ipc.read_message(pa.py_buffer(data[block.offset:block.end]))
            assert ipc.read_record_batch(message, reader.schema).equals(reader.get_batch(i))


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "shuffled"])
def test_stream_yields_the_samples_of_getitem_in_the_given_order(ds_dir, cold, shuffled):
    reference = Dataset(ds_dir)
    order = reference.sample_order(seed=5) if shuffled else np.arange(len(reference))
    if cold:
        evict(ds_dir)
    else:
        for i in range(len(reference)):  # fault every sample into the page cache
            reference[i]["aux_hidden_states"].sum()
    # a small read-ahead and request size, so that several requests and slots are in play
    streamed = list(Dataset(ds_dir).stream(order, readahead_bytes=1 << 20, max_request=256 << 10))
    assert len(streamed) == len(order)
    for i, sample in zip(order, streamed):
        _assert_same(sample, reference[int(i)])


@pytest.mark.parametrize("populate", [True, False], ids=["populate", "populate-refused"])
def test_a_partly_cached_stream_switches_between_map_runs_and_reads(ds_dir, monkeypatch, populate):
    from shared.stream import residency

    reference = Dataset(ds_dir)
    evict(ds_dir)
    for i in [*range(3, 9), 15, 22, *range(30, 40)]:  # runs of cached samples between cold ones
        reference[i]["aux_hidden_states"].sum()
    monkeypatch.setattr(residency(), "_populate_ok", populate)
    ds = Dataset(ds_dir)
    cached = [ds.shard_file(k).cached(ds.shard_file(k).blocks()[r]) for k, r in map(ds.locate, range(len(ds)))]
    assert any(cached) and not all(cached)
    streamed = list(ds.stream(readahead_bytes=1 << 20, max_request=256 << 10))
    assert len(streamed) == len(ds)
    for i, sample in enumerate(streamed):
        _assert_same(sample, reference[i])


def test_cold_stream_reads_around_the_page_cache(ds_dir):
    if not o_direct_works(ds_dir):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    evict(ds_dir)
    assert cached_fraction(ds_dir) == 0.0
    for sample in Dataset(ds_dir).stream():
        sample["aux_hidden_states"].sum()  # touch the bytes
    # O_DIRECT: the epoch came from the disk without filling the cache
    assert cached_fraction(ds_dir) < 0.1
    for sample in Dataset(ds_dir).stream(direct=False):
        sample["aux_hidden_states"].sum()
    assert cached_fraction(ds_dir) == 1.0  # the map path goes through the cache


def test_stream_falls_back_to_the_map_where_o_direct_is_refused(ds_dir, monkeypatch):
    # Every filesystem on this machine (tmpfs included, since Linux 6.6) accepts O_DIRECT,
    # so the refusal (EINVAL, as from FUSE or older tmpfs) is simulated at os.open.
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    evict(ds_dir)
    reference = Dataset(ds_dir)
    ds = Dataset(ds_dir)
    streamed = list(ds.stream())
    assert ds.shard_file(0).direct_fd() is None
    for i, sample in enumerate(streamed):
        _assert_same(sample, reference[i])


def test_streamed_tensors_outlive_the_stream_and_own_writable_memory(ds_dir):
    if not o_direct_works(ds_dir):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    evict(ds_dir)
    with Dataset(ds_dir).stream(range(3)) as stream:
        kept = list(stream)
    expected = [Dataset(ds_dir)[i]["last_hidden_state"].clone() for i in range(3)]
    for sample, want in zip(kept, expected):
        assert torch.equal(sample["last_hidden_state"], want)
        sample["last_hidden_state"].add_(1)  # a private buffer: no warning, no effect on the file
    assert torch.equal(Dataset(ds_dir)[0]["last_hidden_state"], expected[0])


def test_corrupt_record_batch_in_a_cold_stream_names_the_shard(ds_dir, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(ds_dir, copy)
    if not o_direct_works(copy):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    victim = load_manifest(copy).shards[0].file
    data = bytearray((copy / victim).read_bytes())
    block = record_batch_blocks(bytes(data))[1]
    data[block.offset:block.offset + 16] = b"\xff" * 16  # the message header of sample 1
    (copy / victim).write_bytes(bytes(data))
    evict(copy)
    with pytest.raises(ShardError, match=f"{victim}: sample 1 is not a readable record batch"):
        list(Dataset(copy).stream())


def _damage(path: Path, row: int, how: str) -> None:
    """Rewrite bytes of record batch `row` so that its layout still parses but a field lies."""
    from shared.sample_codec import FIELDS, FIRST_BUFFER, N_BUFFERS, batch_layout

    data = bytearray(path.read_bytes())
    block = record_batch_blocks(bytes(data))[row]
    nodes, buffers, body = batch_layout(memoryview(data), block.offset, block, len(FIELDS), N_BUFFERS)
    if how == "offsets":  # aux_hidden_states' row 0 ends past its data buffer
        offsets = body + buffers[2 * FIRST_BUFFER["aux_hidden_states"] + 2]
        data[offsets + 8:offsets + 16] = (buffers[2 * FIRST_BUFFER["aux_hidden_states"] + 5] + 1).to_bytes(8, "little")
    else:  # one token more than the tensors hold
        value = body + buffers[2 * FIRST_BUFFER["num_tokens"] + 2]
        t = int.from_bytes(data[value:value + 4], "little")
        data[value:value + 4] = (t + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [
    pytest.param("offsets", r"sample 2 field aux_hidden_states has offsets \[0, \d+\) outside its \d+-byte "
                 r"data buffer", id="offsets"),
    pytest.param("num_tokens", r"sample 2: field input_ids holds \d+ bytes, expected \d+ for shape", id="num_tokens"),
])
@pytest.mark.parametrize("read", ["getitem", "warm-stream", "cold-stream"])
def test_a_sample_whose_field_lies_is_named_with_its_file_and_field(ds_dir, tmp_path, how, message, read):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(ds_dir, copy)
    victim = load_manifest(copy).shards[0].file
    _damage(copy / victim, 2, how)
    ds = Dataset(copy)
    assert ds.locate(2) == (0, 2)
    if read == "cold-stream":
        if not o_direct_works(copy):
            pytest.skip("the test directory's filesystem refuses O_DIRECT")
        evict(copy)
    else:  # just written: cached, a warm stream decodes on its pool thread
        assert cached_fraction(copy) == 1.0
    with pytest.raises(ShardError, match=f"{victim}:? {message}"):
        if read == "getitem":
            ds[2]
        else:
            list(ds.stream(readahead_bytes=1 << 20, max_request=256 << 10))


def test_residency_sees_an_evicted_file_as_not_cached(ds_dir):
    def first_sample_cached() -> bool:
        source = Dataset(ds_dir).shard_file(0)
        return source.cached(source.blocks()[0])

    Dataset(ds_dir)[0]["aux_hidden_states"].sum()
    assert first_sample_cached()
    evict(ds_dir)  # (pages mapped by a live Dataset could not be evicted: none is alive here)
    assert not first_sample_cached()


def test_buffer_pool_hands_a_freed_buffer_out_again_and_keeps_a_bounded_amount():
    from shared.stream import BufferPool

    pool = BufferPool(keep_bytes=40 << 20)
    first = pool.acquire(3 << 20)
    address = first.ctypes.data
    assert address % 4096 == 0, "O_DIRECT needs page-aligned buffers"
    view = torch.frombuffer(memoryview(first), dtype=torch.uint8)  # a tensor keeps it in use
    del first
    other = pool.acquire(1 << 20)
    assert other.ctypes.data != address
    del view  # the last user is gone: the buffer goes back to the pool
    again = pool.acquire(5 << 20)
    assert again.ctypes.data == address
    big = [pool.acquire(20 << 20) for _ in range(3)]  # 32 MiB buffers, one size for all three
    assert {len(b) for b in big} == {32 << 20}
    del big, again, other
    assert pool._free_bytes <= 40 << 20


def test_a_buffer_freed_inside_the_pools_own_lock_is_kept_without_a_deadlock():
    # A finalizer runs wherever a garbage collection frees the last view - also inside
    # acquire(), lock held, in the same thread: a stream's copy thread deadlocked on itself so.
    import threading

    from shared.stream import BufferPool

    pool = BufferPool()
    result: dict[str, int] = {}

    def free_inside_the_lock() -> None:
        buffer = pool.acquire(1 << 20)
        result["address"] = buffer.ctypes.data
        with pool._lock:
            del buffer  # the finalizer, as if called by a collection inside acquire()
        result["again"] = pool.acquire(1 << 20).ctypes.data

    thread = threading.Thread(target=free_inside_the_lock, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "freeing a buffer while the pool's lock is held deadlocked"
    assert result["again"] == result["address"], "the buffer freed meanwhile was not handed out again"


def _huge_page_bytes(address: int) -> int:
    """AnonHugePages of the mapping of this process that contains `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) << 10
    raise AssertionError(f"no mapping holds address {address:#x}")


def test_buffer_pool_buffers_are_in_huge_pages_where_the_kernel_offers_them():
    # 4 KiB pages cut an O_DIRECT read into requests of max_segments pages (~1 MiB on
    # virtio); huge pages let one request reach max_sectors_kb (README "Shard storage").
    from shared.stream import BufferPool

    if thp_mode() not in ("always", "madvise"):
        pytest.skip("transparent huge pages are off in this kernel")
    buffer = BufferPool().acquire(16 << 20)
    assert buffer.ctypes.data % (2 << 20) == 0
    assert _huge_page_bytes(buffer.ctypes.data) >= 8 << 20  # populated, and mostly huge


def test_buffer_pool_buffers_are_private_to_a_forked_worker():
    # A forked loader worker inherits the pool's free list; its reads must not land in the
    # parent's buffers (they would with shared anonymous memory).
    from shared.stream import BufferPool

    pool = BufferPool()
    buffer = pool.acquire(1 << 20)
    buffer[:4096] = 1
    address = buffer.ctypes.data
    del buffer  # back in the free list, which the child inherits
    pid = os.fork()
    if pid == 0:
        child = pool.acquire(1 << 20)
        child[:4096] = 2
        os._exit(0 if child.ctypes.data == address else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child took another buffer than the parent's free one"
    again = pool.acquire(1 << 20)
    assert again.ctypes.data == address and again[:4096].max() == 1


@pytest.fixture
def direct_file(tmp_path):
    """(an O_DIRECT descriptor, the file's bytes), closed after the test."""
    path = tmp_path / "bytes.bin"
    data = np.random.default_rng(0).integers(0, 256, size=(1 << 20) + 1234, dtype=np.uint8).tobytes()
    path.write_bytes(data)  # not a whole number of blocks: the last read comes up short
    fd = open_direct(path)
    if fd is None:
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("readers", [1, 3])
def test_landing_reader_hands_back_each_range_whole_through_small_chunks(direct_file, readers):
    from shared.stream import DIRECT_ALIGN, LandingReader

    fd, data = direct_file
    # every range crosses several chunks; with 3 readers they land out of order
    reader = LandingReader(chunk=3 * DIRECT_ALIGN, readers=readers, landing=readers + 1)
    try:
        ranges = [(0, 100), (5000, 70_000), (4096, 4096 + 3 * 4096), (123_457, len(data)), (len(data) - 1, len(data))]
        futures = [reader.submit(fd, start, end) for start, end in ranges]
        for (start, end), future in zip(ranges, futures):
            got = future.result(timeout=30)
            first = start - start % DIRECT_ALIGN
            assert got.ctypes.data % DIRECT_ALIGN == 0
            assert got[start - first:end - first].tobytes() == data[start:end]
    finally:
        reader.close()


def test_landing_buffers_are_made_off_the_callers_thread_and_reused_by_the_next_reader(direct_file, monkeypatch):
    # Fresh memory faults in slowly: a warm stream that meets one evicted sample started a
    # reader and waited ~30 ms for its landing buffers on every epoch.
    import threading

    from shared import stream

    made: list[tuple[int, str]] = []
    real = stream.direct_buffer
    monkeypatch.setattr(stream, "direct_buffer",
                        lambda size: made.append((size, threading.current_thread().name)) or real(size))
    monkeypatch.setattr(stream, "POOL", stream.BufferPool())
    fd, data = direct_file
    for round in range(3):
        reader = stream.LandingReader(chunk=8192, readers=2, landing=3)
        try:
            got = reader.submit(fd, 100, 20_000).result(timeout=30)
            assert got[100:20_000].tobytes() == data[100:20_000]
            del got
        finally:
            reader.close()
        if round == 0:  # three landing buffers (whole huge pages) and the range's own
            assert sorted(size for size, _ in made) == [2 << 20] * 3 + [18 << 20]
            assert {name for _, name in made} == {"specmill-copy"}
    assert len(made) == 4, "a later reader made buffers instead of taking the pool's"


def test_landing_reader_without_memory_for_its_buffers_fails_each_range_instead_of_hanging(direct_file,
                                                                                            monkeypatch):
    import errno

    from shared import stream

    def no_memory(size):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(stream, "direct_buffer", no_memory)
    monkeypatch.setattr(stream, "POOL", stream.BufferPool())
    fd, _ = direct_file
    reader = stream.LandingReader(chunk=8192, readers=2, landing=3)
    try:
        for future in [reader.submit(fd, 0, 20_000), reader.submit(fd, 20_000, 30_000)]:
            with pytest.raises(OSError, match="Cannot allocate memory"):
                future.result(timeout=30)
    finally:
        reader.close()


def test_landing_reader_fails_one_range_past_the_end_and_serves_the_next(direct_file):
    from shared.stream import LandingReader

    fd, data = direct_file
    reader = LandingReader(chunk=8192, readers=2, landing=3)
    try:
        past = reader.submit(fd, len(data) - 10, len(data) + 50_000)
        after = reader.submit(fd, 0, 20_000)
        with pytest.raises(EOFError, match=f"file ends at {len(data)}"):
            past.result(timeout=30)
        assert after.result(timeout=30)[:20_000].tobytes() == data[:20_000]
        bad = reader.submit(-1, 0, 4096)  # a closed descriptor: the OSError reaches the waiter
        with pytest.raises(OSError):
            bad.result(timeout=30)
    finally:
        reader.close()


def test_landing_reader_skips_cancelled_ranges_and_its_threads_end_unclosed(direct_file):
    import gc

    from shared.stream import LandingReader

    fd, data = direct_file
    reader = LandingReader(chunk=8192, readers=2, landing=3)
    gate = reader.submit(fd, 0, len(data))  # keeps the reading thread busy for a while
    skipped = reader.submit(fd, 0, 4096)
    assert skipped.cancel() or skipped.done()
    assert gate.result(timeout=30)[:len(data)].tobytes() == data
    assert skipped.cancelled()
    threads = reader._threads
    del reader, gate  # never closed: dropping it must still stop both threads
    gc.collect()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_closing_a_cold_stream_midway_stops_its_reading_threads(ds_dir):
    import threading

    from shared.stream import LandingReader

    if not o_direct_works(ds_dir):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    evict(ds_dir)
    before = {t.name for t in threading.enumerate()}
    stream = Dataset(ds_dir).stream(readahead_bytes=1 << 30)  # everything submitted at once
    first = next(stream)
    assert {t.name for t in threading.enumerate()} - before >= {"specmill-read", "specmill-copy"}
    with pytest.raises(ValueError, match="landing more than readers"):
        LandingReader(readers=2, landing=2)
    stream.close()
    assert not {t.name for t in threading.enumerate()} - before
    _assert_same(first, Dataset(ds_dir)[0])
