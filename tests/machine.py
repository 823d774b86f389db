"""What the machine running the tests offers, for tests that skip where it is missing."""

from __future__ import annotations

from pathlib import Path


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (always, madvise, never), or "absent"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]
