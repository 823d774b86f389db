"""The data set manifest: what a directory of shards holds and how it was made.

`manifest.json` is the only index of a data set. A shard file exists for readers only
once it is listed here, and the manifest is replaced atomically (write, fsync, rename;
on an object store one PUT, written after the shard objects it lists), so a reader never
sees a shard that was not fully written. Data sets may live on a filesystem URI
(shared.storage).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from shared.storage import Location

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# What `aux_layer_ids` mean. vLLM's convention: id i is the residual stream *entering*
# decoder layer i, which is HF `output_hidden_states[i]`. SGLang/SpecForge number the
# same tensors as layer *outputs* (i - 1).
AUX_CONVENTIONS = ("residual_entering_layer", "layer_output")
LAST_HIDDEN_STATES = ("pre_norm", "post_norm")
DTYPES = ("bfloat16", "float16")


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """vLLM's EAGLE-3 default for a `num_layers`-layer target: early, middle and late
    residual streams. The one place this formula lives."""
    return (2, num_layers // 2, num_layers - 3)


class ManifestError(ValueError):
    """A manifest that is missing, malformed or incompatible; the message names the file."""


@dataclass(kw_only=True, slots=True)
class TargetInfo:
    """Fingerprints of the target model the hidden states came from."""

    name: str
    config_sha256: str
    tokenizer_sha256: str
    chat_template_sha256: str
    vocab_size: int
    num_hidden_layers: int

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"target.{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True, slots=True)
class ShardInfo:
    file: str
    rows: int
    tokens: int
    loss_tokens: int
    bytes: int
    sha256: str


@dataclass(kw_only=True, slots=True)
class DatasetHeader:
    """Everything that must agree between every shard of one data set."""

    target: TargetInfo
    hidden_size: int
    dtype: str = "bfloat16"
    aux_layer_ids: tuple[int, int, int]
    aux_layer_convention: str = "residual_entering_layer"
    last_hidden_state: str = "pre_norm"

    def __post_init__(self) -> None:
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"aux_layer_ids must name 3 layers, got {self.aux_layer_ids}")
        if self.aux_layer_convention not in AUX_CONVENTIONS:
            raise ValueError(
                f"aux_layer_convention must be one of {AUX_CONVENTIONS}, got {self.aux_layer_convention!r}"
            )
        if self.last_hidden_state not in LAST_HIDDEN_STATES:
            raise ValueError(
                f"last_hidden_state must be one of {LAST_HIDDEN_STATES}, got {self.last_hidden_state!r}"
            )
        n_layers = self.target.num_hidden_layers
        if not all(0 <= i <= n_layers for i in self.aux_layer_ids):
            raise ValueError(f"aux_layer_ids {self.aux_layer_ids} must lie in [0, {n_layers}]")

    def mismatches(self, other: DatasetHeader) -> list[str]:
        """Fields that differ, as 'field: mine != theirs' lines (empty when compatible)."""
        mine, theirs = _flatten(dataclasses.asdict(self)), _flatten(dataclasses.asdict(other))
        return [f"{k}: {mine[k]!r} != {theirs.get(k)!r}" for k in mine if mine[k] != theirs.get(k)]


@dataclass(kw_only=True, slots=True)
class Manifest:
    header: DatasetHeader
    shards: list[ShardInfo] = field(default_factory=list)
    # Loss-masked token id -> count, summed over listed shards (the draft vocab comes from it).
    token_counts: dict[int, int] = field(default_factory=dict)
    complete: bool = False
    # Free-form provenance: the job's generation settings, counts of dropped rows, ...
    info: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        header = d.pop("header")
        # Sorted string keys: JSON objects need them, and a stable order makes diffs readable.
        d["token_counts"] = {str(k): v for k, v in sorted(self.token_counts.items())}
        return {"schema_version": d.pop("schema_version"), **header, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, source: str = "manifest") -> Manifest:
        try:
            version = d["schema_version"]
            if version != SCHEMA_VERSION:
                raise ManifestError(
                    f"{source}: schema_version {version} is not supported (this specmill reads {SCHEMA_VERSION})"
                )
            header = DatasetHeader(
                target=TargetInfo(**d["target"]),
                hidden_size=d["hidden_size"],
                dtype=d["dtype"],
                aux_layer_ids=tuple(d["aux_layer_ids"]),
                aux_layer_convention=d["aux_layer_convention"],
                last_hidden_state=d["last_hidden_state"],
            )
            return cls(
                header=header,
                shards=[ShardInfo(**s) for s in d["shards"]],
                token_counts=dict(zip(map(int, d["token_counts"]), map(int, d["token_counts"].values()))),
                complete=bool(d["complete"]),
                info=dict(d.get("info", {})),
            )
        except KeyError as e:
            raise ManifestError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{source}: {e}") from None


def load_manifest(directory: str | os.PathLike | Location) -> Manifest:
    """Read a data set's manifest; `directory` is a local path or a filesystem URI (see shared.storage)."""
    where = Location.parse(directory)
    try:
        text = where.read_bytes(MANIFEST_NAME).decode()
    except FileNotFoundError:
        raise ManifestError(f"{where.name(MANIFEST_NAME)}: no manifest; is {where} a specmill data set?") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where.name(MANIFEST_NAME)}: not valid JSON ({e})") from None
    return Manifest.from_json(raw, source=where.name(MANIFEST_NAME))


def save_manifest(directory: str | os.PathLike | Location, manifest: Manifest) -> None:
    Location.parse(directory).write_bytes_atomic(MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1).encode())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out
