"""Checkpoints: `OUT/checkpoints/step-000000123/{state.pt, meta.json}` (trainer.run_layout),
written atomically.

`state.pt` is one dict, `{name: component.state_dict()}` for every resumable component
(model, optimizer, scheduler, data loader position, RNG states, loop state); `meta.json`
is the sidecar a person reads: resolved config, step, schema version, fingerprints of the
data set and the target, the data position, the draft's architecture and vocab settings
(export needs nothing else). None of it depends on the rank count (trainer/distributed.py):
a run resumes on another one if its global batch stays the same.

Atomic: the directory is written under a temporary name, every file fsynced, renamed into
place, and the parent fsynced; a `step-*` directory therefore always holds a whole
checkpoint, and a crash mid-save leaves only a `.tmp-*` directory that the next save removes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from shared.storage import fsync_dir
from trainer.run_layout import META_FILE, STATE_FILE, checkpoint_name, checkpoints_dir

log = logging.getLogger("specmill.trainer")

SCHEMA_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint made from another config, data set or target than this run's."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) generator states, as one resumable component."""

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, out: Path, *, keep: int):
        self.dir = checkpoints_dir(out)
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir)

    def save(self, step: int, state: dict[str, dict[str, Any]], meta: dict[str, Any]) -> Path:
        """Write `{name: component.state_dict()}` and meta as checkpoint `step`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale)
        final = self.dir / checkpoint_name(step)
        tmp = self.dir / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
        tmp.mkdir()
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**meta, "schema_version": SCHEMA_VERSION, "step": step}, indent=1))
        for name in (STATE_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run that stops at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        for old in sorted(self.dir.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
        return final

    def load(self, path: Path, components: dict[str, Stateful]) -> dict[str, Any]:
        """Restore every component from `path`; returns its meta."""
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        state = _upgrade(state, path)
        missing = set(components) - set(state)
        if missing:
            raise CheckpointMismatch(f"{path}: checkpoint lacks state for {sorted(missing)}")
        for name, component in components.items():
            component.load_state_dict(state[name])
        return read_meta(path)


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(p for p in Path(directory).glob("step-*") if (p / META_FILE).exists())
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a checkpoint (no {META_FILE})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint schema_version {meta.get('schema_version')} is not "
                                 f"supported (this specmill reads {SCHEMA_VERSION})")
    return meta


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run's --out directory (its newest checkpoint)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    found = latest_checkpoint(checkpoints_dir(path))
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return found


# Identity fields added after checkpoints were first written, each with the value that
# describes how the older checkpoints without it were trained: such a checkpoint resumes
# when this run has that value, and is refused (naming the field) otherwise.
FIELDS_ADDED_LATER: dict[str, Any] = {"distributed.strategy": "ddp", "precision": "fp32",
                                      "draft.init_sha256": None, "data.temperatures": None,
                                      "draft.norm_before_fc": False, "draft.norm_output": False}


def global_batch(meta: dict[str, Any]) -> tuple[int, int]:
    """(ranks, data.micro_batches per rank) of the run that wrote `meta`; their product, the
    micro-batches of one optimizer step, is what a resumed run must keep."""
    identity = meta["identity"]
    if "global_micro_batches" in identity:
        return meta["world_size"], meta["config"]["data"]["micro_batches"]
    # written before elastic resume: the identity held the rank count (and, later, micro_batches)
    return identity["world_size"], identity.get("data.micro_batches", 1)


def check_compatible(saved: dict[str, Any], now: dict[str, Any], *, path: Path) -> None:
    """Refuse a checkpoint whose identity (config fields that define the training, the global
    batch, the data set fingerprint, the target fingerprint) differs from this run's, naming
    each difference. The rank count may change if the global batch does not."""
    diffs = []
    saved_identity = {k: v for k, v in saved["identity"].items() if k not in ("world_size", "data.micro_batches")}
    saved_identity["global_micro_batches"] = math.prod(global_batch(saved))
    for key in sorted(set(saved_identity) | set(now["identity"])):
        a = saved_identity.get(key, FIELDS_ADDED_LATER.get(key, "<absent>"))
        b = now["identity"].get(key, "<absent>")
        if key == "precision" and a == "auto":  # written before identities held the resolved value
            continue
        if key == "global_micro_batches" and a != b:
            diffs.append(_global_batch_change(saved, now))
        elif a != b:
            diffs.append(f"config {key}: checkpoint {a!r} != now {b!r}")
    for key, what in (("dataset_fingerprint", "data set"), ("target_fingerprint", "target model")):
        if saved[key] != now[key]:
            diffs.append(f"{what} fingerprint: checkpoint {saved[key][:16]}... != now {now[key][:16]}... "
                         f"({what} {saved.get(key.replace('fingerprint', 'path'))} vs "
                         f"{now.get(key.replace('fingerprint', 'path'))})")
    if diffs:
        raise CheckpointMismatch(
            f"{path}: checkpoint was made by another run; use a new --out directory or the same settings. "
            "Differences: " + "; ".join(diffs))


def _global_batch_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    (ranks, per_rank), (now_ranks, now_per_rank) = global_batch(saved), global_batch(now)
    total = ranks * per_rank
    if total % now_ranks == 0:
        keep = f"to keep it on {now_ranks} rank(s), set data.micro_batches = {total // now_ranks}"
    else:
        fits = [n for n in range(1, total + 1) if total % n == 0]
        keep = (f"{total} micro-batches do not split evenly over {now_ranks} ranks; run on a rank count that "
                f"divides {total} ({', '.join(map(str, fits))})")
    return (f"global batch: checkpoint {total} micro-batches of data.token_budget tokens per step "
            f"({ranks} rank(s) x data.micro_batches = {per_rank}) != now {now_ranks * now_per_rank} "
            f"({now_ranks} rank(s) x {now_per_rank}); {keep}")


def _upgrade(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint's state in this specmill's layout, from one written by an earlier specmill."""
    data = state.get("data")
    if data is not None and "ranks" in data:
        # one data position per rank, as saved before elastic resume; one global stream, so they agree
        positions = data["ranks"]
        if any(p != positions[0] for p in positions):
            raise CheckpointMismatch(f"{path}: its ranks' data positions differ ({positions}); it cannot be resumed")
        state = {**state, "data": positions[0]}
    return state
