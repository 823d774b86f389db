"""A factory job's configuration: one TOML file (or command-line flags) -> `JobConfig`.

This is the only place a job's settings are read. Each component gets its own section
(`[input]`, `[sampling]`, `[servers]`, `[render]`, `[capture]`, `[output]`, `[ray]`) as a
dataclass validated on construction; an unknown key is an error that names it and the
keys its section knows, so a typo never turns into a silent default.

    model = "~/.cache/specmill/models/SmolLM2-135M-Instruct"

    [input]
    paths = ["prompts.jsonl", "more/"]     # JSONL or Parquet files, or directories of them
    format = "auto"                        # auto | messages | sharegpt | prompt
    max_samples = 1000

    [sampling]
    max_tokens = 512
    temperatures = [0.0, 0.7, 1.0]         # the mix; each sample draws one from its id
    top_p = 0.95

    [servers]
    replicas = 1                           # vLLM servers this job starts (or urls = [...])

    [output]
    dir = "runs/job1"

Relative paths are taken relative to the TOML file's directory. Flags given on the command
line override the file, key by key (`overrides` in `load_job`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.capture import CaptureConfig
from factory.render import RenderConfig
from factory.targets import MODEL_DTYPES, TargetConfig
from shared import tomlconfig
from shared.manifest import DTYPES

INPUT_FORMATS = ("auto", "messages", "sharegpt", "prompt")
SCHEDULING = ("DEFAULT", "SPREAD")
CAPTURE_BACKENDS = ("auto", "vllm", "transformers")  # Ray scheduling strategies a job may name


class JobConfigError(ValueError):
    """A job file or flag that cannot be used; the message names the key and what was expected."""


@dataclass(kw_only=True, slots=True)
class InputConfig:
    paths: tuple[Path, ...]  # JSONL / Parquet files, or directories searched for them
    format: str = "auto"  # auto: each row by its fields (messages, conversations, prompt_column)
    prompt_column: str | None = None  # a plain-text prompt column, made one user turn
    max_samples: int | None = None  # the first N input rows (malformed ones count)

    def __post_init__(self) -> None:
        if self.paths is None:
            raise JobConfigError("the job needs `input.paths` (flag --prompts)")
        self.paths = tuple(Path(p).expanduser() for p in self.paths)
        if not self.paths:
            raise JobConfigError("input.paths must name at least one JSONL or Parquet file or directory")
        if self.format not in INPUT_FORMATS:
            raise JobConfigError(f"input.format must be one of {INPUT_FORMATS}, got {self.format!r}")
        if self.format == "prompt" and not self.prompt_column:
            raise JobConfigError("input.format = 'prompt' needs input.prompt_column, the column holding the prompt")
        if self.max_samples is not None and self.max_samples < 1:
            raise JobConfigError(f"input.max_samples must be positive (or left out for all rows), got {self.max_samples}")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    max_tokens: int = 512  # per answer
    # The temperature mix: each sample draws one, deterministically from its id.
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    temperature_weights: tuple[float, ...] | None = None  # None: equal weights
    top_p: float = 1.0
    thinking: bool | None = None  # the template's thinking switch (enable_thinking); None: template default
    keep_truncated: bool = True  # keep samples whose answer hit max_tokens (finish_reason "length")
    seed: int = 0  # mixed into every per-request seed and temperature draw
    keep_original_answers: bool = False  # render the data set's own answers; no vLLM

    def __post_init__(self) -> None:
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if self.max_tokens < 1:
            raise JobConfigError(f"sampling.max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise JobConfigError(f"sampling.temperatures must be a non-empty list of numbers >= 0, got {self.temperatures}")
        if self.temperature_weights is not None:
            self.temperature_weights = tuple(float(w) for w in self.temperature_weights)
            if len(self.temperature_weights) != len(self.temperatures) or any(w < 0 for w in self.temperature_weights) \
                    or sum(self.temperature_weights) <= 0:
                raise JobConfigError(f"sampling.temperature_weights must give one weight >= 0 per temperature "
                                     f"({len(self.temperatures)}), not all zero; got {self.temperature_weights}")
        if not 0 < self.top_p <= 1:
            raise JobConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")

    def generation_settings(self) -> dict[str, Any]:
        """What decides the answers, and so enters every sample id: the same source row under
        other settings is another sample."""
        if self.keep_original_answers:
            return {"answers": "original"}
        return {"answers": "resampled", "max_tokens": self.max_tokens, "temperatures": list(self.temperatures),
                "temperature_weights": list(self.temperature_weights) if self.temperature_weights else None,
                "top_p": self.top_p, "thinking": self.thinking, "seed": self.seed}

    def temperature_for(self, sample_id: str) -> float:
        """The sample's draw from the temperature mix, fixed by its id (and the job's seed)."""
        weights = self.temperature_weights or (1.0,) * len(self.temperatures)
        u = _unit_hash(f"{self.seed}:temperature:{sample_id}") * sum(weights)
        for t, w in zip(self.temperatures, weights):
            if u < w:
                return t
            u -= w
        return self.temperatures[-1]

    def request_seed(self, sample_id: str, turn: int) -> int:
        """vLLM's per-request `seed`: the same sample and turn sample the same answer after a restart."""
        return int(hashlib.sha256(f"{self.seed}:request:{sample_id}:{turn}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(kw_only=True, slots=True)
class ServersConfig:
    """vLLM OpenAI servers: given ones (`urls`), or `replicas` that the job starts as Ray actors."""

    urls: tuple[str, ...] = ()
    replicas: int = 1  # ignored when urls are given
    model_name: str | None = None  # the `model` requests name; None: what the server's /v1/models lists
    # Passed to every started server after --model/--host/--port; --max-model-len defaults to
    # render.max_length (nothing longer is kept). The defaults suit the CPU build: eager mode
    # starts in half the time, and chunked prefill must be off there because a seeded request
    # in a partly prefilled batch kills the engine ("CPU Generator does not use offset").
    # On GPUs, `vllm_args = []` is the faster choice.
    vllm_args: tuple[str, ...] = ("--enforce-eager", "--no-enable-chunked-prefill")
    env: dict[str, str] = field(default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "2"})
    num_cpus: float = 1.0  # Ray resources each server actor holds
    num_gpus: float = 0.0
    startup_timeout_s: float = 600.0
    concurrency: int = 32  # requests in flight per server
    request_timeout_s: float = 600.0
    max_attempts: int = 6  # per request, on 5xx and transport errors; a 4xx quarantines the row
    backoff_s: float = 1.0  # doubled after each failure, up to max_backoff_s
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        self.urls = tuple(u.rstrip("/") for u in self.urls)
        self.vllm_args = tuple(str(a) for a in self.vllm_args)
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise JobConfigError(f"servers.urls entries must be http(s) base URLs like http://host:8000, got {url!r}")
        if self.replicas < 1:
            raise JobConfigError(f"servers.replicas must be at least 1, got {self.replicas}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise JobConfigError(f"servers.concurrency and servers.max_attempts must be positive, got "
                                 f"{self.concurrency} and {self.max_attempts}")
        if min(self.backoff_s, self.max_backoff_s, self.request_timeout_s, self.startup_timeout_s) <= 0:
            raise JobConfigError("servers.backoff_s, max_backoff_s, request_timeout_s and startup_timeout_s must be positive")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise JobConfigError("servers.num_cpus and servers.num_gpus must be >= 0")
        for flag in ("--model", "--host", "--port", "--served-model-name"):
            if any(a == flag or a.startswith(flag + "=") for a in self.vllm_args):
                raise JobConfigError(f"servers.vllm_args must not contain {flag}: the job sets it")
        bad = {k: v for k, v in self.env.items() if not isinstance(v, str)}
        if bad:
            raise JobConfigError(f"servers.env values must be strings, got {bad}")


@dataclass(kw_only=True, slots=True)
class CaptureSettings(CaptureConfig):
    """How hidden states are captured and kept (CaptureConfig's fields: aux_layer_ids,
    storage_dtype, max_batch_tokens, max_batch_size) and where and how the target runs.

    `backend`: "vllm" runs the target on the job's own capture servers (a vLLM server per
    capture actor, text targets only); "transformers" runs it in the capture actor (every
    modality); "auto" picks vllm for a text target the installed vLLM serves, else
    transformers (`factory.pipeline.choose_capture_backend` says which and why)."""

    backend: str = "auto"
    dtype: str = "auto"  # the forward pass's dtype; auto: bfloat16 where native (GPU, AMX CPU), else float32
    device: str = "cpu"  # "cuda" on a GPU node (with num_gpus = 1)
    num_cpus: float = 1.0  # Ray resources the capture actor holds (with its vLLM server, for the vllm backend)
    num_gpus: float = 0.0
    # The vllm backend's server: more engine flags (e.g. ["--tensor-parallel-size", "2"]), more
    # environment, the CPU build's KV cache in GiB, requests in flight per server, start-up limit.
    vllm_args: tuple[str, ...] = ()
    vllm_env: dict[str, str] = field(default_factory=dict)
    vllm_kv_cache_gib: int = 2
    vllm_concurrency: int = 32
    vllm_startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in CAPTURE_BACKENDS:
            raise JobConfigError(f"capture.backend must be one of {CAPTURE_BACKENDS}, got {self.backend!r}")
        self.vllm_args = tuple(str(a) for a in self.vllm_args)
        bad = {k: v for k, v in self.vllm_env.items() if not isinstance(v, str)}
        if bad:
            raise JobConfigError(f"capture.vllm_env values must be strings, got {bad}")
        if self.vllm_concurrency < 1 or self.vllm_kv_cache_gib < 1 or self.vllm_startup_timeout_s <= 0:
            raise JobConfigError("capture.vllm_concurrency, capture.vllm_kv_cache_gib and "
                                 "capture.vllm_startup_timeout_s must be positive")
        if self.dtype not in MODEL_DTYPES:
            raise JobConfigError(f"capture.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.storage_dtype not in DTYPES:
            raise JobConfigError(f"capture.storage_dtype must be one of {DTYPES}, got {self.storage_dtype!r}")
        if self.device.startswith("cuda") and self.num_gpus <= 0:
            raise JobConfigError("capture.device is cuda but capture.num_gpus is 0: Ray would place the actor "
                                 "on a node without a GPU; set capture.num_gpus = 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise JobConfigError("capture.num_cpus and capture.num_gpus must be >= 0")
        try:
            CaptureConfig.__post_init__(self)  # super() needs a __class__ cell that slots=True breaks
        except ValueError as e:
            raise JobConfigError(f"capture: {e}") from None

    def capture_config(self) -> CaptureConfig:
        """The capture stage's part alone (what the capture actor is given)."""
        return CaptureConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CaptureConfig)})

    def target_config(self, model: Path) -> TargetConfig:
        return TargetConfig(model=model, dtype=self.dtype, device=self.device)

    def vllm_capture_config(self, render: RenderConfig, log_dir: Path | None = None):
        """The vllm backend's server and client settings (a `factory.vllm_capture.VllmCaptureConfig`)."""
        from factory.vllm_capture import VllmCaptureConfig

        try:
            return VllmCaptureConfig(aux_layer_ids=self.aux_layer_ids, dtype=self.storage_dtype,
                                     max_concurrency=self.vllm_concurrency, max_length=render.max_length,
                                     kv_cache_gib=self.vllm_kv_cache_gib, extra_args=self.vllm_args,
                                     env=dict(self.vllm_env), log_dir=log_dir,
                                     startup_timeout_s=self.vllm_startup_timeout_s)
        except ValueError as e:
            raise JobConfigError(f"capture: {e}") from None


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    dir: Path  # the shard data set; quarantine files, progress.json and job.json live beside the shards
    shard_bytes: int = 256 << 20
    commit_every: int = 64  # samples (written or quarantined) between commits
    commit_interval_s: float = 60.0  # ... or seconds, whichever comes first
    # The job is refused before it starts when its disk plan (factory.plan: an upper bound on
    # the finished data set) exceeds the free space where it goes; true runs it anyway.
    ignore_free_space: bool = False

    def __post_init__(self) -> None:
        if self.dir is None:
            raise JobConfigError("the job needs `output.dir` (flag --out)")
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/", str(self.dir))  # "s3://b" is "s3:/b" once a Path
        if scheme and scheme.group(1) == "file":
            self.dir = re.sub(r"^file:/+", "/", str(self.dir))
        elif scheme:
            # The shard writer could (shared/storage.py), but quarantine files, progress.json and
            # job.json are still written with local file calls: refuse rather than write to "s3:/...".
            raise JobConfigError(f"output.dir {str(self.dir)!r}: the factory writes to a local or shared-volume "
                                 f"directory only; object-store output is not supported yet (the trainer "
                                 f"reads s3:// data sets: copy the finished directory there)")
        self.dir = Path(self.dir).expanduser()
        if self.dir.exists() and not self.dir.is_dir():
            raise JobConfigError(f"output.dir {self.dir} is a file; name a directory")
        if self.shard_bytes < 1 << 10 or self.commit_every < 1 or self.commit_interval_s <= 0:
            raise JobConfigError("output.shard_bytes must be >= 1 KiB, output.commit_every and "
                                 "output.commit_interval_s positive")


@dataclass(kw_only=True, slots=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://... joins a cluster
    num_cpus: int | None = None  # local Ray only; None: the machine's
    object_store_mb: int | None = None  # local Ray only; None: Ray's default
    resamplers: int = 1  # async client actors (one saturates many servers)
    batch_size: int = 8  # prompts per resample task
    capture_batch: int = 16  # rendered rows per capture task
    max_in_flight: int | None = None  # samples between read and write; None: 2 x server slots + 2 capture batches
    actor_max_restarts: int = 3  # a killed worker is restarted and its tasks retried this often
    # Capture actors, each holding the target; capture batches go round-robin over them. On a
    # cluster, several (with scheduling = "SPREAD") put capture on several nodes, and an actor lost
    # with its node is restarted where room is left, its tasks retried there.
    capture_actors: int = 1
    scheduling: str = "DEFAULT"  # Ray's placement of the job's actors: DEFAULT (pack) or SPREAD (over nodes)

    def __post_init__(self) -> None:
        if self.address is not None and (self.num_cpus is not None or self.object_store_mb is not None):
            raise JobConfigError("ray.num_cpus and ray.object_store_mb size a local Ray; leave them out with ray.address")
        if self.scheduling not in SCHEDULING:
            raise JobConfigError(f"ray.scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")
        for name in ("resamplers", "batch_size", "capture_batch", "capture_actors"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"ray.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_in_flight is not None and self.max_in_flight < self.batch_size:
            raise JobConfigError(f"ray.max_in_flight ({self.max_in_flight}) must be at least ray.batch_size "
                                 f"({self.batch_size})")
        if self.actor_max_restarts < 0:
            raise JobConfigError("ray.actor_max_restarts must be >= 0")


@dataclass(kw_only=True, slots=True)
class JobConfig:
    model: Path  # the target: a local model directory, served by vLLM and run for capture
    input: InputConfig
    output: OutputConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    servers: ServersConfig = field(default_factory=ServersConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.model is None:
            raise JobConfigError("the job needs `model` (flag --model)")
        self.model = Path(self.model).expanduser()
        if not (self.model / "config.json").is_file():
            raise JobConfigError(f"model must be a local model directory with a config.json; {self.model} has none "
                                 f"(`specmill model prepare-default` prints the default one)")
        thinking = self.sampling.thinking
        if thinking is not None:
            given = self.render.chat_template_kwargs.get("enable_thinking", thinking)
            if given != thinking:
                raise JobConfigError(f"sampling.thinking = {thinking} contradicts render.chat_template_kwargs."
                                     f"enable_thinking = {given}; set one of them")
            self.render.chat_template_kwargs["enable_thinking"] = thinking

    def to_json(self) -> dict[str, Any]:
        """The resolved job, as written beside the shards."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# --------------------------------------------------------------------------- loading


def load_job(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """The job in the TOML file at `path` (if any), with `overrides` ({"section.key": value},
    None values ignored) applied on top. The one place a job's settings are read."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        table = tomlconfig.read_table(path, JobConfigError)
        tomlconfig.resolve_paths(table, _PATH_KEYS, path.parent)
    tomlconfig.apply_overrides(table, overrides, JobConfigError)
    return tomlconfig.build(JobConfig, table, error=JobConfigError, source=str(path) if path is not None else "flags")


# Relative paths in a job file are relative to the file.
_PATH_KEYS = ("model", "input.paths", "output.dir")


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text`."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:13], 16) / 16**13
