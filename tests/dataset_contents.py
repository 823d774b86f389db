"""A finished factory data set read back whole, for tests that compare two runs' output."""

from __future__ import annotations

import json
from pathlib import Path

from shared.manifest import Manifest, load_manifest
from shared.shards import Dataset, verify


def read_back(out: Path) -> tuple[Manifest, list[dict], list[dict]]:
    """(manifest, every sample, every quarantine record) of a complete, verified data set."""
    result = verify(out)
    assert result.ok, result.errors
    manifest = load_manifest(out)
    assert manifest.complete
    ds = Dataset(out)
    samples = [ds[i] for i in range(len(ds))]
    quarantine = [json.loads(line) for entry in manifest.info["quarantine"]["files"]
                  for line in (out / entry["file"]).read_text().splitlines()]
    return manifest, samples, quarantine
