"""A real small file system for disk-full tests: a tmpfs with a size limit, mounted for the
length of a `with` block (the test is skipped, saying why, where mounting is not permitted)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "2m") at `where`, unmounted after the block."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a size-limited tmpfs, and mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        # Lazily where a process the test started still holds a file there (it goes when that does).
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)
