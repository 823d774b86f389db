"""One row's failure or the job's: the line every pipeline stage draws at its row boundary.

Each stage does its per-row work (read, render, resample, capture, write) inside a row
boundary. An exception raised there is that row's failure: the row is quarantined with the
exception's type and message and the job goes on. A row that raised once raises again, so
letting it stop the job would stop the job on that row at every restart.

Not a row's failure, and so raised past the boundary to stop the job (which resumes when it
is run again):

- a `JobFailure`: servers still down after every retry, a target that cannot run;
- the machine's trouble: out of memory (`MemoryError`, torch's `OutOfMemoryError`) and
  `OSError`s whose errno is about the machine (disk full, read-only file system, I/O error,
  no file descriptors left), not about a path a row named;
- anything that is not an `Exception` (KeyboardInterrupt, SystemExit, asyncio cancellation).

The line leans towards the job on purpose: a quarantined row is skipped for good when the
job resumes, while a job stopped for nothing only costs a restart.
"""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import dataclass

# The machine's errnos: they say nothing about the row that happened to meet them.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE,
                            errno.ENOMEM})
REASON_CHARS = 500
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class JobFailure(RuntimeError):
    """Not about one row (a server that stays down, a broken target): the job stops, and
    running it again resumes it."""


@dataclass(kw_only=True, slots=True)
class RowFailure:
    """A row a stage gave up on, as it travels back to the driver to be quarantined."""

    sample_id: str
    stage: str
    reason: str


def machine_trouble(e: BaseException) -> bool:
    """Out of memory, or an OSError about the machine rather than a path."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only where a forward pass may have run out of device memory
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, OSError) and e.errno in MACHINE_ERRNOS


def disk_full(e: BaseException) -> bool:
    """No space left (or the quota spent) where the job writes."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def is_row_failure(e: BaseException) -> bool:
    """Whether `e`, raised by one row's work, quarantines that row (see the module docstring)."""
    return isinstance(e, Exception) and not isinstance(e, JobFailure) and not machine_trouble(e)


def row_reason(e: BaseException, stage: str) -> str:
    """A quarantine reason for an unexpected exception: where, its type and its message."""
    text = f"the {stage} stage raised {type(e).__name__}: {e}"
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


@dataclass(kw_only=True, slots=True)
class QuarantineRecord:
    file: str
    row: int
    index: int  # position in the whole input
    stage: str  # read | resample | render | capture | write
    reason: str
    sample_id: str | None = None

    def line(self) -> str:
        """The record as one line of a quarantine file."""
        return json.dumps({"file": self.file, "row": self.row, "index": self.index, "sample_id": self.sample_id,
                           "stage": self.stage, "reason": self.reason}) + "\n"
