"""A data set's place in the page cache, for tests of what reads from the disk and what from memory."""

from __future__ import annotations

import os
from pathlib import Path

from shared.manifest import load_manifest
from shared.shards import Dataset
from shared.stream import open_direct


def evict(directory: Path) -> None:
    """Drop this data set's pages from the page cache (only these files, nothing global)."""
    for info in load_manifest(directory).shards:
        fd = os.open(directory / info.file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(directory: Path) -> float:
    """The fraction of the data set's samples the page cache holds (by the stream's own probe)."""
    ds = Dataset(directory)
    cached = total = 0
    for k in range(len(ds.manifest.shards)):
        source = ds.shard_file(k)
        for block in source.blocks():
            cached += source.cached(block)
            total += 1
    return cached / total


def o_direct_works(directory: Path) -> bool:
    """Whether the filesystem holding the data set takes O_DIRECT reads."""
    fd = open_direct(directory / load_manifest(directory).shards[0].file)
    if fd is None:
        return False
    os.close(fd)
    return True
