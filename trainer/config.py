"""The training configuration: one dataclass per component, loaded from TOML in one place.

A run is described by one TOML file (or only command-line flags); `load_config` is the
only function that reads TOML. Each component receives its own section:

    out = "runs/llama-eagle3"        steps = 20000        seed = 0
    [target]     path = "/models/Llama-3.1-8B-Instruct"
    [data]       path = "/data/shards"   token_budget = 4096   val_samples = 256
    [draft]      draft_vocab_size = 32000   init = "runs/earlier/draft"  (optional warm start)
    [ttt]        steps = 7   step_decay = 0.8
    [optim]      lr = 1e-4   grad_clip = 0.5
    [checkpoint] every = 500 keep = 2
    [distributed] strategy = "ddp"      (or "fsdp"; only with several torchrun processes)

Relative paths in a TOML file are relative to that file; paths given as flags are
relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shared import tomlconfig
from shared.hardware import bf16_is_native

DEVICES = ("auto", "cpu", "cuda")
# auto: bf16 autocast on CUDA and on CPUs with bf16 matrix instructions (AMX or AVX512-BF16:
# ~1.6-2x faster there, see the README's bench train figures), plain fp32 on other CPUs.
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "constant")
STRATEGIES = ("ddp", "fsdp")

# Fields that may change between a run and its resumption without changing what is
# trained: where things are, how often we log or save, when to stop early. Every other
# field must match the checkpoint (see checkpoint.check_compatible). The data set and
# the target are identified by fingerprints, not by their paths.
RUN_CONTROL_FIELDS = frozenset({
    "out", "device", "stop_after", "log_every", "eval_every", "progress",
    "target.path", "data.path", "data.prefetch", "checkpoint.every", "checkpoint.keep",
    "draft.init",  # identified by its weights' digest (init_sha256), not its path
    # only the global batch, ranks x micro_batches, must match (a run may resume on other ranks)
    "data.micro_batches",
})


class ConfigError(ValueError):
    """A configuration value that is missing or invalid; the message names the field and the fix."""


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{section}{name} must be an integer, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{section}{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def _float(section: str, obj: Any, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{section}{name} must be a number, got {value!r}")
    value = float(value)
    if not (low <= value <= high) or math.isnan(value):
        raise ConfigError(f"{section}{name} must lie in [{low}, {high}], got {value}")
    object.__setattr__(obj, name, value)


@dataclass(kw_only=True, slots=True)
class TargetPathConfig:
    """[target]: where the target model is, its HF directory (config.json + safetensors). Only
    the embedding, the final norm and the lm_head are loaded from it. (Not factory.targets.
    TargetConfig, which says how the factory runs a whole target.)"""

    path: Path

    def __post_init__(self) -> None:
        if self.path is None or str(self.path) == "":
            raise ConfigError("target.path is required: set [target] path in the TOML file or pass --target DIR")
        self.path = Path(self.path)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The shard data set and how it is batched."""

    path: Path | str  # a directory, or a URI (s3://..., see shared/storage.py) kept as written
    # Tokens in one packed batch (samples are concatenated until the next would not fit).
    # Attention is computed in segments of ~512 tokens cut at sample boundaries
    # (model.SEGMENT_TOKENS), so its score memory grows with L x 512, not L x L; a sample
    # longer than 512 tokens is a segment of its own (its n x n scores, k of them for backward).
    token_budget: int = 4096
    # Longer samples are cut to their first max_seq_len tokens; None = token_budget.
    max_seq_len: int | None = None
    # Samples held out for validation (a seeded choice, never trained on).
    val_samples: int = 0
    # Micro-batches (each one packed row of token_budget tokens) per optimizer step on each
    # rank; gradients are averaged over them (accumulation). The global batch is
    # world_size x micro_batches micro-batches of one global stream (see trainer/data.py);
    # a run resumes on another rank count if this product stays the same.
    micro_batches: int = 1
    # Steps read ahead by the background thread.
    prefetch: int = 4
    # Train (and validate) only on samples whose answers were generated at one of these
    # temperatures (the shards' `temperature` column), e.g. [0.0] for greedy answers only
    # when the draft will serve greedy decoding; None = every sample. The draft vocab is
    # still counted over the whole data set (the manifest's token counts).
    temperatures: tuple[float, ...] | float | None = None  # one number: that temperature alone

    def __post_init__(self) -> None:
        if self.path is None or str(self.path) == "":
            raise ConfigError("data.path is required: set [data] path in the TOML file or pass --data DIR")
        self.path = str(self.path) if is_uri(self.path) else Path(self.path)
        _positive("data.", self, "token_budget", "max_seq_len", "micro_batches", "prefetch")
        _positive("data.", self, "val_samples", allow_zero=True)
        if self.temperatures is not None:
            if isinstance(self.temperatures, (int, float)):
                self.temperatures = (self.temperatures,)
            if not self.temperatures or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0
                                                for t in self.temperatures):
                raise ConfigError(f"data.temperatures must be a non-empty list of numbers >= 0, got "
                                  f"{self.temperatures!r}")
            self.temperatures = tuple(float(t) for t in self.temperatures)
        if self.max_seq_len is None:
            self.max_seq_len = self.token_budget
        if self.max_seq_len > self.token_budget:
            raise ConfigError(f"data.max_seq_len ({self.max_seq_len}) exceeds data.token_budget "
                              f"({self.token_budget}); raise token_budget or lower max_seq_len")


@dataclass(kw_only=True, slots=True)
class DraftConfig:
    """The draft's size. hidden_size is always the target's (the draft reads its hidden
    states and shares its embedding); the others default (None) to the target's config.json."""

    # Capped at the number of distinct loss-masked ids in the data set (see vocab.py).
    draft_vocab_size: int = 32000
    # Start from this exported draft (specmill export, either format) instead of the target's
    # head: its layer, fc and norm as they are, its lm_head rows for the draft ids it shares
    # with this data set's draft vocab (the other rows start as the mean of its rows; see
    # export.warm_start). Its shape must be this run's; the optimizer and schedule start afresh.
    init: Path | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # "EAGLE 3.1" normalisation, named as vLLM's EAGLE-3 draft config names them (it reads both
    # from an export): an RMSNorm over the concatenated aux hidden states before fc, and the
    # post-final-norm hidden state fed back as the draft's recurrent input. Off until measured.
    norm_before_fc: bool = False
    norm_output: bool = False

    def __post_init__(self) -> None:
        for name in ("norm_before_fc", "norm_output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"draft.{name} must be true or false, got {getattr(self, name)!r}")
        if self.init is not None:
            if str(self.init) == "" or is_uri(self.init):
                raise ConfigError(f"draft.init must be a local export directory, got {self.init!r}")
            self.init = Path(self.init)
        _positive("draft.", self, "draft_vocab_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim")
        if self.num_attention_heads and self.num_key_value_heads:
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(f"draft.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                                  f"of draft.num_key_value_heads ({self.num_key_value_heads})")


@dataclass(kw_only=True, slots=True)
class TTTConfig:
    """Training-time test: how far the draft is unrolled on its own outputs."""

    steps: int = 7
    # Loss weight of unroll step i is step_decay ** i.
    step_decay: float = 0.8

    def __post_init__(self) -> None:
        _positive("ttt.", self, "steps")
        _float("ttt.", self, "step_decay", 0.0, 1.0)


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    schedule: str = "cosine"
    # Linear warmup over this fraction of the run's steps, then the schedule.
    warmup_fraction: float = 0.02
    # Cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _float("optim.", self, "lr", 0.0, 1.0)
        if self.lr == 0:
            raise ConfigError("optim.lr must be positive, got 0")
        _float("optim.", self, "eps", 0.0, 1.0)
        _float("optim.", self, "weight_decay", 0.0, 10.0)
        _float("optim.", self, "grad_clip", 0.0, math.inf)
        _float("optim.", self, "warmup_fraction", 0.0, 1.0)
        _float("optim.", self, "min_lr_ratio", 0.0, 1.0)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    # Save every N steps (and at the end, and on SIGTERM); 0 = only at the end and on SIGTERM.
    every: int = 500
    # Keep the newest N checkpoints.
    keep: int = 2

    def __post_init__(self) -> None:
        _positive("checkpoint.", self, "every", allow_zero=True)
        _positive("checkpoint.", self, "keep")


@dataclass(kw_only=True, slots=True)
class DistributedConfig:
    """How ranks started by torchrun share the work (ignored with one process).

    ddp: every rank holds the whole draft; gradients are all-reduced. fsdp: the draft's
    parameters, gradients and optimizer state are sharded across ranks (torch FSDP2
    `fully_shard` on fc, the decoder layer, norm and lm_head), for a draft too large to
    replicate (a wide lm_head over a big draft vocab)."""

    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    out: Path
    steps: int
    target: TargetPathConfig
    data: DataConfig
    draft: DraftConfig = field(default_factory=DraftConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"
    # Matmul precision of the forward/backward (master weights and optimizer stay fp32);
    # see PRECISIONS and resolve_precision.
    precision: str = "auto"
    log_every: int = 10
    # Validate every N steps (needs data.val_samples > 0); 0 = only at the end.
    eval_every: int = 0
    # Save and exit after this step, as a preempted job would (for tests and time-sliced queues).
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.out is None or str(self.out) == "":
            raise ConfigError("out is required: set out = DIR in the TOML file or pass --out DIR")
        self.out = Path(self.out)
        _positive("", self, "steps", "log_every", "stop_after")
        _positive("", self, "eval_every", "seed", allow_zero=True)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be true or false, got {self.progress!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_every and not self.data.val_samples:
            raise ConfigError(f"eval_every = {self.eval_every} needs held-out samples: set data.val_samples > 0 "
                              "(or --val-samples N)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config (paths as strings)."""
        return _jsonable(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """The flattened fields that define what is trained (everything but run control)."""
        return {k: v for k, v in _flatten(self.to_dict()).items() if k not in RUN_CONTROL_FIELDS}


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Build the TrainConfig from a TOML file (optional) and dotted overrides
    (`{"data.path": ..., "steps": 100}`), which win over the file."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        raw = tomlconfig.read_table(path, ConfigError)
        tomlconfig.resolve_paths(raw, _PATH_KEYS, path.resolve().parent)
        source = str(path)
    tomlconfig.apply_overrides(raw, overrides, ConfigError)
    return tomlconfig.build(TrainConfig, raw, error=ConfigError, source=source, term="field")


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE in TOML syntax (bare words are taken as strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


# --------------------------------------------------------------------------- internals

# Relative paths in a TOML file are relative to that file.
_PATH_KEYS = ("out", "target.path", "data.path", "draft.init")


def is_uri(path: Any) -> bool:
    """`s3://bucket/x` and the like; Path() would fold its `//` and break it."""
    return isinstance(path, str) and "://" in path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_precision(precision: str, device_type: str) -> str:
    """"bf16" or "fp32": what `precision` means on this device (see PRECISIONS)."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_native(device_type) else "fp32"
