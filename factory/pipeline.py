"""A factory job: prompts in, a finished shard data set out, under Ray, exactly once.

    read (driver, lazy) -> resample + render (async actor) -> capture (actor holding the
    target) -> write (driver: the single writer)

`build_pipeline()` is the only place stages are wired. The driver reads the input lazily
and keeps at most `ray.max_in_flight` samples between read and write (`ray.wait` is the
back-pressure), so memory stays bounded however large the input is. Ray restarts a
killed actor and retries its in-flight tasks (`ray.actor_max_restarts`).

Exactly once. Every sample has an id: the hash of its source chat and the generation
settings. The driver alone writes: samples go to `ShardWriter`, rows that cannot be used
to quarantine records, and both are committed together: the quarantine records of a
commit are written as `quarantine-NNNNN.jsonl` (temporary file, fsync, rename), then the
manifest, listing the new shard and the new quarantine file in one atomic replace, makes
both visible. Whatever a killed driver left that the manifest does not list is deleted on
restart; the samples in the shards (`done_ids`) and the quarantined rows (by file and row)
are skipped, and the rest is done again. A source chat that appears twice is one sample:
its later rows are quarantined as duplicates of the first.

Disk. Before anything starts, a job whose disk plan (factory.plan) needs more than the free
space is refused. A disk that fills anyway stops the job (the job's failure, never a row's):
the open shard, never listed, is deleted, nothing else is committed (its IPC writer cannot be
finished after a failed write), and running the job again once space is freed resumes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.inputs import MediaPaths, SourceRow, count_rows, read_rows
from factory.job import JobConfig, JobConfigError, OutputConfig
from factory.plan import plan_job
from factory.ray_auth import own_token, token_in_process
from factory.render import RenderedRow
from factory.resample import Outcome, Prompt, read_prompt
from factory.rows import QuarantineRecord, RowFailure, disk_full
from shared.manifest import DatasetHeader, ManifestError, load_manifest, save_manifest
from shared.shards import Sample, SampleError, ShardWriter
from shared.storage import atomic_write_bytes

log = logging.getLogger("specmill.factory.pipeline")

QUARANTINE_PREFIX = "quarantine-"
QUARANTINE_SUFFIX = ".jsonl"
PROGRESS_NAME = "progress.json"
JOB_NAME = "job.json"


def _lost_work_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean a task's actor, worker or node went away, not that the stage failed."""
    from ray import exceptions as e

    return (e.RayActorError, e.ObjectLostError, e.NodeDiedError, e.WorkerCrashedError)


class FactoryError(RuntimeError):
    """The job stopped (a server or an actor failed past its retries); what was committed stays, and
    running the same job again resumes it."""


# --------------------------------------------------------------------------- quarantine + shards


class JobOutput:
    """The single writer: shards and quarantine records, committed together (see the module
    docstring). `done_ids()` and `quarantined()` say what a restarted job must skip."""

    def __init__(self, config: OutputConfig, header: DatasetHeader, generation: dict[str, Any],
                 capture: dict[str, Any] | None = None):
        self.dir = config.dir
        self.writer = ShardWriter(self.dir, header, shard_bytes=config.shard_bytes)
        info = self.writer.manifest.info
        if info.get("generation", generation) != generation:
            raise FactoryError(f"{self.dir} was started with other generation settings ({info['generation']}, now "
                               f"{generation}); use a new output.dir or the same settings")
        info["generation"] = generation
        if capture is not None:
            info["capture"] = _capture_history(info.get("capture"), capture)
        info.setdefault("quarantine", {"files": [], "rows": 0, "by_stage": {}})
        self._remove_unlisted_quarantine()
        save_manifest(self.dir, self.writer.manifest)
        self._pending: list[QuarantineRecord] = []
        self.uncommitted = 0

    @property
    def manifest(self):
        return self.writer.manifest

    def done_ids(self) -> set[str]:
        return self.writer.done_ids()

    def quarantined(self) -> set[tuple[str, int]]:
        """(file, row) of every committed quarantine record."""
        seen = set()
        for entry in self.manifest.info["quarantine"]["files"]:
            with open(self.dir / entry["file"]) as f:
                for line in f:
                    record = json.loads(line)
                    seen.add((record["file"], record["row"]))
        return seen

    def add(self, sample: Sample) -> None:
        self.writer.add(sample)
        self.uncommitted += 1

    def quarantine(self, record: QuarantineRecord) -> None:
        self._pending.append(record)
        self.uncommitted += 1

    def commit(self) -> None:
        """Make every sample and quarantine record so far durable, in one manifest replace."""
        summary = self.manifest.info["quarantine"]
        if self._pending:
            name = f"{QUARANTINE_PREFIX}{len(summary['files']):05d}{QUARANTINE_SUFFIX}"
            lines = "".join(r.line() for r in self._pending)
            atomic_write_bytes(self.dir / name, lines.encode())
            summary["files"].append({"file": name, "rows": len(self._pending)})
            summary["rows"] += len(self._pending)
            stages = Counter(summary["by_stage"]) + Counter(r.stage for r in self._pending)
            summary["by_stage"] = dict(sorted(stages.items()))
            self._pending = []
        # With a shard pending, ShardWriter.commit lists it and the quarantine file above in one
        # manifest replace; without one it does nothing, and the save below lists the file.
        self.writer.commit()
        save_manifest(self.dir, self.manifest)
        self.uncommitted = 0

    def close(self, info: dict[str, Any]) -> None:
        self.commit()
        self.writer.close(complete=True, info=info)

    def abort(self) -> None:
        self.writer.abort()

    def _remove_unlisted_quarantine(self) -> None:
        listed = {e["file"] for e in self.manifest.info["quarantine"]["files"]}
        for path in self.dir.glob(f"{QUARANTINE_PREFIX}*{QUARANTINE_SUFFIX}"):
            if path.name not in listed:
                log.info("removing %s: left by an interrupted job, not in the manifest", path.name)
                path.unlink()


def _capture_history(earlier: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `capture` entry: how this run captures, and how earlier runs of the job did
    if that differed (both backends give the same samples within bf16 rounding, so a resumed
    job may switch; the data set says so)."""
    if earlier is None:
        return now
    before = [*earlier.get("earlier", []), {k: v for k, v in earlier.items() if k != "earlier"}]
    if before[-1] == now:
        before.pop()
    else:
        log.warning("this run captures with %s; earlier runs of this job captured with %s (the manifest keeps both)",
                    now, before[-1])
    return {**now, "earlier": before} if before else now


# --------------------------------------------------------------------------- progress


@dataclass(kw_only=True, slots=True)
class Progress:
    """Counts per stage, shown with tqdm and rewritten atomically to progress.json."""

    path: Path
    total: int  # input rows this job covers
    show: bool = True
    started: float = field(default_factory=time.monotonic)
    skipped: int = 0  # done by an earlier run
    read: int = 0
    resampled: int = 0
    generated_tokens: int = 0
    captured: int = 0
    captured_tokens: int = 0
    written: int = 0
    quarantined: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    _bar: Any = None
    _last_write: float = 0.0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, desc="factory", unit="sample", disable=not self.show, dynamic_ncols=True)

    def tick(self, *, force: bool = False) -> None:
        done = self.skipped + self.written + self.quarantined
        self._bar.n = done
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self._bar.set_postfix_str(f"gen {self.generated_tokens / elapsed:.0f} tok/s, captured {self.captured}, "
                                  f"quarantined {self.quarantined}", refresh=False)
        self._bar.refresh()
        if force or time.monotonic() - self._last_write >= 2.0:
            self._last_write = time.monotonic()
            atomic_write_bytes(self.path, json.dumps(self.snapshot(), indent=1).encode())

    def snapshot(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        done_here = self.written + self.quarantined
        remaining = self.total - self.skipped - done_here
        rate = done_here / elapsed if elapsed > 0 else 0.0
        per_s = lambda n: round(n / elapsed, 2) if elapsed > 0 else 0.0  # noqa: E731
        return {
            "total": self.total, "done": self.skipped + done_here, "skipped_already_done": self.skipped,
            "elapsed_s": round(elapsed, 1), "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            "stages": {
                "read": {"samples": self.read, "per_s": per_s(self.read)},
                "resample": {"samples": self.resampled, "generated_tokens": self.generated_tokens,
                             "tokens_per_s": per_s(self.generated_tokens)},
                "capture": {"samples": self.captured, "tokens": self.captured_tokens,
                            "tokens_per_s": per_s(self.captured_tokens)},
                "write": {"samples": self.written, "per_s": per_s(self.written)},
                "quarantine": {"samples": self.quarantined},
            },
            "finish_reasons": dict(self.finish_reasons),
        }

    def close(self, *, write: bool = True) -> None:
        if write:
            self.tick(force=True)
        self._bar.close()


# --------------------------------------------------------------------------- actors


class _ResampleActor:
    """Ray wrapper of `ResampleStage` (async: one actor keeps many requests in flight)."""

    def __init__(self, job: JobConfig, urls: list[str], server_names: list[str], media: MediaPaths):
        import ray

        from factory.resample import ResampleStage
        from factory.targets import Frontend

        _quiet_logging()
        # By name, not handle: handles in constructor arguments would pin them in the object store.
        server_actors = [ray.get_actor(name) for name in server_names]
        frontend = Frontend.load(job.capture.target_config(job.model))
        self.stage = ResampleStage(frontend=frontend, render=job.render, sampling=job.sampling, servers=job.servers,
                                   urls=urls, actors=server_actors, model_name=job.servers.model_name, media=media)
        _log_restart("resample")

    async def run(self, prompts: list[Prompt]) -> list[Outcome]:
        return await self.stage(prompts)

    def pid(self) -> int:
        return os.getpid()


class _CaptureActor:
    """Ray wrapper of `CaptureStage` (the transformers backend): holds the target's weights where
    the job puts them."""

    def __init__(self, job: JobConfig):
        from factory.capture import CaptureStage

        _quiet_logging()
        self.stage = CaptureStage(job.capture.target_config(job.model), job.capture.capture_config())
        _log_restart("capture")

    def header(self) -> DatasetHeader:
        return self.stage.header

    def run(self, rows: list[RenderedRow]) -> list[Sample]:
        return self.stage(rows)

    def stop(self) -> None:
        pass  # nothing runs beside this actor

    def pid(self) -> int:
        return os.getpid()


class _VllmCaptureActor:
    """Ray wrapper of `VllmCaptureStage` (the vllm backend): the job's own capture server, a vLLM
    child process of this actor that dies with it, restarted by the stage when it stops answering.
    Async: the batches the driver queues here are in flight on the server together."""

    def __init__(self, job: JobConfig):
        from factory.vllm_capture import VllmCaptureStage

        _quiet_logging()
        _log_restart("capture")
        config = job.capture.vllm_capture_config(job.render, log_dir=job.output.dir / "logs")
        self.stage = VllmCaptureStage(job.capture.target_config(job.model), config)

    def header(self) -> DatasetHeader:
        return self.stage.header

    async def run(self, rows: list[RenderedRow]) -> list[Sample | RowFailure]:
        return await self.stage.acall(rows)

    def stop(self) -> None:
        """Stop the capture server cleanly (SIGTERM to its process group), before Ray kills this actor."""
        self.stage.close()

    def pid(self) -> int:
        return os.getpid()


def _log_restart(stage: str) -> None:
    import ray

    import warnings

    with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated property here
        warnings.simplefilter("ignore")
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
    if restarted:
        log.warning("%s actor restarted after its worker died (pid %d); Ray retries its tasks", stage, os.getpid())


def _quiet_logging() -> None:
    """Actor logs reach the driver's terminal: INFO from specmill, not a line per HTTP request."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptureBackend:
    """Which backend captures a job's hidden states, and why (logged, kept in the manifest)."""

    name: str  # "vllm" | "transformers"
    reason: str
    compute_dtype: str  # what the forward pass runs in (capture.dtype resolved)

    def to_json(self) -> dict[str, str]:
        return {"backend": self.name, "reason": self.reason, "compute_dtype": self.compute_dtype}


def choose_capture_backend(job: JobConfig) -> CaptureBackend:
    """`capture.backend` resolved: as the job says, or for "auto" vllm where the installed vLLM
    serves the target as a text model, else transformers. Asking for vllm where it cannot run is
    an error that says why."""
    from shared.hardware import resolve_model_dtype

    dtype = resolve_model_dtype(job.capture.dtype, job.capture.device)
    setting = job.capture.backend
    if setting == "transformers":
        return CaptureBackend(name="transformers", reason="capture.backend = transformers", compute_dtype=dtype)
    problem = _vllm_capture_problem(job.model)
    if setting == "vllm":
        if problem:
            raise JobConfigError(f"capture.backend = vllm, but {problem}; set capture.backend = transformers or auto")
        return CaptureBackend(name="vllm", reason="capture.backend = vllm", compute_dtype=dtype)
    if problem:
        return CaptureBackend(name="transformers", reason=f"auto: {problem}", compute_dtype=dtype)
    return CaptureBackend(name="vllm", reason="auto: a text target the installed vLLM serves", compute_dtype=dtype)


def _vllm_capture_problem(model: Path) -> str | None:
    """Why the vllm backend cannot capture `model`, or None if it can."""
    import importlib.util

    from factory.targets import TargetError, read_json, spec_for

    raw = read_json(model / "config.json")
    try:
        spec = spec_for(raw.get("model_type", ""))
    except TargetError as e:
        return str(e)
    if spec.media:
        return (f"{model.name} is a {spec.family} target (with {', '.join(m.kind for m in spec.media)} input), and "
                f"vLLM capture takes text targets only")
    found = importlib.util.find_spec("vllm")
    if found is None or not found.submodule_search_locations:
        return "vLLM is not installed"
    architectures = raw.get("architectures") or []
    if not architectures:
        return f"{model}/config.json names no architecture for vLLM to load"
    # vLLM's model registry read as text: importing it takes 10-100 s on a small CPU.
    registry = Path(found.submodule_search_locations[0]) / "model_executor" / "models" / "registry.py"
    try:
        listed = registry.read_text()
    except OSError as e:
        return f"vLLM's model registry could not be read to check {architectures[0]} ({e})"
    if f'"{architectures[0]}"' not in listed:
        return f"the installed vLLM does not list {architectures[0]} among its models"
    return None


@dataclass(kw_only=True, slots=True)
class Pipeline:
    """The wired stages: actor handles and the job. `run()` drives them."""

    job: JobConfig
    media: MediaPaths  # which files the rows' media paths may name
    resamplers: list[Any]
    captures: list[Any]  # capture actors; batches go round-robin over them
    capture_backend: CaptureBackend
    servers: list[Any]  # VllmServerActor handles (empty when the job was given URLs or keeps answers)
    server_slots: int  # requests in flight across all servers
    timings: dict[str, float] = field(default_factory=dict)  # start-up phases, seconds

    def run(self, *, show_progress: bool = True) -> dict[str, Any]:
        return _Driver(self, show_progress=show_progress).run()

    def shutdown(self) -> None:
        import ray

        for actor in [*self.servers, *self.captures]:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - best effort: the actor may already be gone
                log.warning("stopping a server or capture actor failed: %s", e)
        for actor in [*self.resamplers, *self.captures, *self.servers]:
            ray.kill(actor)


def build_pipeline(job: JobConfig, *, media: MediaPaths, capture: CaptureBackend | None = None) -> Pipeline:
    """Start the actors a job needs, in an initialised Ray: vLLM server actors (unless the job
    gives URLs or keeps the original answers), resampler actors, the capture actors (each with its
    own vLLM capture server for the vllm backend). `media` says which files the rows' media paths
    may name (the user's own, or the service's roots); `capture`: the backend, by default
    `choose_capture_backend(job)`."""
    import ray

    from factory.resample import VllmServerActor, server_config

    started = time.monotonic()
    capture = capture or choose_capture_backend(job)
    retries = dict(max_restarts=job.ray.actor_max_restarts, max_task_retries=job.ray.actor_max_restarts,
                   scheduling_strategy=job.ray.scheduling)
    # First, so the target loads (or its capture server starts) while the resample servers start.
    actor = _VllmCaptureActor if capture.name == "vllm" else _CaptureActor
    capture_cls = ray.remote(actor).options(num_cpus=job.capture.num_cpus, num_gpus=job.capture.num_gpus, **retries)
    captures = [capture_cls.remote(job) for _ in range(job.ray.capture_actors)]
    servers: list[Any] = []
    urls: list[str] = list(job.servers.urls)
    if not job.sampling.keep_original_answers and not urls:
        log_dir = job.output.dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        server_cls = ray.remote(VllmServerActor)
        servers = [server_cls.options(name=f"specmill-vllm-{i}", num_cpus=job.servers.num_cpus,
                                      num_gpus=job.servers.num_gpus, max_concurrency=4, **retries)
                   .remote(server_config(job.model, job.servers, job.render, log_dir))
                   for i in range(job.servers.replicas)]
        log.info("starting %d vLLM server(s); waiting for health", len(servers))
        try:
            urls = ray.get([s.endpoint.remote() for s in servers])
        except ray.exceptions.RayActorError as e:
            # The actor's __init__ failed (Ray does not restart those): the server exited or was
            # not healthy within servers.startup_timeout_s; the error ends with its log's tail.
            raise FactoryError(f"the job's vLLM server could not start: {e}") from None
    # The resampler only waits on HTTP: it holds no CPU, so it never starves the server or capture.
    resampler_cls = ray.remote(_ResampleActor).options(num_cpus=0, **retries)
    names = [f"specmill-vllm-{i}" for i in range(len(servers))]
    resamplers = [resampler_cls.remote(job, urls, names, media) for _ in range(job.ray.resamplers)]
    slots = 0 if job.sampling.keep_original_answers else job.servers.concurrency * len(urls)
    timings = {"servers_ready_s": round(time.monotonic() - started, 1)} if servers else {}
    return Pipeline(job=job, media=media, resamplers=resamplers, captures=captures, capture_backend=capture,
                    servers=servers, server_slots=slots, timings=timings)


@dataclass(kw_only=True, slots=True)
class _Flow:
    """The driver loop's state: what is in flight where, and what waits for the next stage."""

    source: Iterator[Prompt | QuarantineRecord]  # the prompts not yet done
    exhausted: bool = False  # the source has given its last prompt
    # ref -> (stage, its input, actor, attempt)
    in_flight: dict[Any, tuple[str, list[Any], int, int]] = field(default_factory=dict)
    # sample id -> prompt, from read until written or quarantined
    meta: dict[str, Prompt] = field(default_factory=dict)
    waiting: list[RenderedRow] = field(default_factory=list)  # rendered, not yet sent to capture
    turn: int = 0  # round-robin position over the resample actors
    capture_turn: int = 0  # ... and over the capture actors
    last_commit: float = field(default_factory=time.monotonic)


class _Driver:
    """The driver loop: feed the resamplers, batch rows for capture, write, commit."""

    def __init__(self, pipeline: Pipeline, *, show_progress: bool):
        self.p = pipeline
        self.job = pipeline.job
        self.show_progress = show_progress
        cfg = self.job.ray
        self.max_in_flight = cfg.max_in_flight or max(2 * pipeline.server_slots + 2 * cfg.capture_batch,
                                                      4 * cfg.capture_batch, cfg.batch_size)

    def run(self) -> dict[str, Any]:
        import ray

        started = time.monotonic()
        try:
            header = ray.get(self.p.captures[0].header.remote())
        except ray.exceptions.RayActorError as e:
            # Its __init__ failed (Ray does not restart those): the target did not load, or the
            # capture server exited or was not healthy in time (the error ends with its log's tail).
            raise FactoryError(f"the job's {self.p.capture_backend.name} capture could not start: {e}") from None
        self.p.timings["capture_ready_s"] = round(time.monotonic() - started, 1)
        out: JobOutput | None = None
        try:
            out = JobOutput(self.job.output, header, self.job.sampling.generation_settings(),
                            capture=self.p.capture_backend.to_json())
            atomic_write_bytes(out.dir / JOB_NAME, json.dumps(self.job.to_json(), indent=1).encode())
            done, quarantined = out.done_ids(), out.quarantined()
            progress = Progress(path=out.dir / PROGRESS_NAME, total=count_rows(self.job.input),
                                show=self.show_progress)
            try:
                self._loop(out, progress, done, quarantined)
            except BaseException as e:
                # Samples already captured are complete and valid: keep them, then stop. Not on a
                # full disk: the open shard is broken there, and a commit would only fail again.
                if not disk_full(e):
                    out.commit()
                progress.close(write=not disk_full(e))
                raise
            progress.close()
            report = self._report(out, progress)
            out.close({"report": report})
        except OSError as e:
            if not disk_full(e):
                raise
            if out is not None:
                out.abort()  # the partial shard: never listed, and deleting it gives its space back
            raise FactoryError(_disk_full_message(self.job.output.dir, e)) from e
        log.info("job complete: %s", json.dumps(report))
        return report

    def _loop(self, out: JobOutput, progress: Progress, done: set[str], quarantined: set[tuple[str, int]]) -> None:
        def quarantine(record: QuarantineRecord) -> None:
            out.quarantine(record)
            progress.quarantined += 1

        flow = _Flow(source=self._prompts(done, quarantined, progress))
        while True:
            self._read_prompts(flow, quarantine)
            self._send_captures(flow)
            if not flow.in_flight:
                if flow.exhausted and not flow.waiting:
                    break
                continue
            self._collect(flow, out, progress, quarantine)
            self._commit_if_due(flow, out)
            progress.tick()
        out.commit()

    def _submit(self, flow: _Flow, stage: str, inputs: list[Any], actor: int, attempt: int = 0) -> None:
        """Send a batch to a stage's actor (round-robin by `actor`)."""
        actors = self.p.resamplers if stage == "resample" else self.p.captures
        actor %= len(actors)
        flow.in_flight[actors[actor].run.remote(inputs)] = (stage, inputs, actor, attempt)

    def _read_prompts(self, flow: _Flow, quarantine) -> None:
        """Read prompts into resample batches while fewer than max_in_flight samples are out."""
        cfg = self.job.ray
        while not flow.exhausted and len(flow.meta) + cfg.batch_size <= self.max_in_flight:
            batch: list[Prompt] = []
            for item in flow.source:
                if isinstance(item, QuarantineRecord):
                    quarantine(item)
                    continue
                batch.append(item)
                if len(batch) == cfg.batch_size:
                    break
            else:
                flow.exhausted = True
            if batch:
                for prompt in batch:
                    flow.meta[prompt.sample_id] = prompt
                self._submit(flow, "resample", batch, flow.turn)
                flow.turn += 1

    def _send_captures(self, flow: _Flow) -> None:
        """Send waiting rows to capture: full batches, or a partial one when capture would idle."""
        cfg = self.job.ray
        resampling = any(stage == "resample" for stage, *_ in flow.in_flight.values())
        capturing = sum(stage == "capture" for stage, *_ in flow.in_flight.values())
        # Two batches per capture actor: one running, one queued behind it.
        while flow.waiting and capturing < 2 * len(self.p.captures) and (
                len(flow.waiting) >= cfg.capture_batch or capturing == 0 or (flow.exhausted and not resampling)):
            rows, flow.waiting = flow.waiting[:cfg.capture_batch], flow.waiting[cfg.capture_batch:]
            self._submit(flow, "capture", rows, flow.capture_turn)
            flow.capture_turn += 1
            capturing += 1

    def _collect(self, flow: _Flow, out: JobOutput, progress: Progress, quarantine) -> None:
        """Wait up to a second for a finished batch and take in its results."""
        import ray

        ready, _ = ray.wait(list(flow.in_flight), num_returns=1, timeout=1.0)
        for ref in ready:
            stage, inputs, actor, attempt = flow.in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except _lost_work_errors() as e:
                # The actor or its node went away with the task (Ray does not retry a task whose
                # actor became unreachable). Stages are pure and the driver alone writes, so
                # running the batch again on the next actor cannot duplicate a sample.
                if attempt >= self.job.ray.actor_max_restarts:
                    raise FactoryError(f"the {stage} stage lost samples {[x.sample_id for x in inputs][:4]}... "
                                       f"{attempt + 1} times; last: {e}") from e
                log.warning("%s batch lost with its actor (%s); running it again on another actor",
                            stage, type(e).__name__)
                self._submit(flow, stage, inputs, actor + 1, attempt + 1)
                continue
            except ray.exceptions.RayError as e:
                raise FactoryError(f"the {stage} stage failed on samples "
                                   f"{[x.sample_id for x in inputs][:4]}...: {e}") from e
            if stage == "resample":
                for outcome in results:
                    self._resampled(outcome, flow.meta, flow.waiting, progress, quarantine)
            else:
                for result in results:
                    self._captured(result, out, flow.meta, progress, quarantine)

    def _commit_if_due(self, flow: _Flow, out: JobOutput) -> None:
        """Commit every commit_every samples or commit_interval_s seconds, whichever comes first."""
        if out.uncommitted >= self.job.output.commit_every or (
                out.uncommitted and time.monotonic() - flow.last_commit >= self.job.output.commit_interval_s):
            out.commit()
            flow.last_commit = time.monotonic()

    def _resampled(self, outcome: Outcome, meta: dict[str, Prompt], waiting: list[RenderedRow],
                   progress: Progress, quarantine) -> None:
        progress.resampled += 1
        progress.generated_tokens += outcome.generated_tokens
        progress.finish_reasons.update(outcome.finish_reasons)
        if outcome.row is not None:
            waiting.append(outcome.row)
            return
        prompt = meta.pop(outcome.sample_id)
        quarantine(QuarantineRecord(file=prompt.file, row=prompt.row, index=prompt.source_index, stage=outcome.stage,
                                    reason=outcome.reason or "unknown", sample_id=prompt.sample_id))

    def _captured(self, result: Sample | RowFailure, out: JobOutput, meta: dict[str, Prompt], progress: Progress,
                  quarantine) -> None:
        prompt = meta.pop(result.sample_id)
        if isinstance(result, RowFailure):
            quarantine(QuarantineRecord(file=prompt.file, row=prompt.row, index=prompt.source_index,
                                        stage=result.stage, reason=result.reason, sample_id=prompt.sample_id))
            return
        progress.captured += 1
        progress.captured_tokens += int(result.input_ids.shape[0])
        try:
            out.add(result)
        except SampleError as e:
            # The writer checks a sample whole before it writes a byte of it, so a refused sample
            # leaves the shard as it was; any other error here (disk full) is the job's.
            quarantine(QuarantineRecord(file=prompt.file, row=prompt.row, index=prompt.source_index,
                                        stage="write", reason=str(e), sample_id=prompt.sample_id))
            return
        progress.written += 1

    def _prompts(self, done: set[str], quarantined: set[tuple[str, int]], progress: Progress
                 ) -> Iterator[Prompt | QuarantineRecord]:
        """Input rows in order, as prompts to run or records to quarantine; what an earlier run
        finished is skipped."""
        first_seen: dict[str, str] = {}
        for src in read_rows(self.job.input):
            progress.read += 1
            if (src.file, src.row) in quarantined:
                progress.skipped += 1
                continue
            item = read_prompt(src, self.job, self.p.media)
            if isinstance(item, str):
                yield _record(src, "read", item)
                continue
            if item.sample_id in first_seen:
                yield _record(src, "read", f"duplicate of {first_seen[item.sample_id]} (same chat, same settings)",
                              item.sample_id)
                continue
            first_seen[item.sample_id] = f"{src.file}:{src.row}"
            if item.sample_id in done:
                progress.skipped += 1
                continue
            yield item

    def _report(self, out: JobOutput, progress: Progress) -> dict[str, Any]:
        m = out.manifest
        q = m.info["quarantine"]
        return {
            "input_rows": progress.total,
            "samples": m.rows,
            "tokens": m.tokens,
            "loss_tokens": sum(s.loss_tokens for s in m.shards),
            "shards": len(m.shards),
            "capture_backend": self.p.capture_backend.name,
            "quarantined": q["rows"],
            "quarantined_by_stage": q["by_stage"],
            "this_run": {"startup": self.p.timings,
                         **{k: v for k, v in progress.snapshot().items()
                            if k in ("elapsed_s", "stages", "finish_reasons", "skipped_already_done")}},
        }


def _disk_full_message(directory: Path, error: OSError) -> str:
    """What a job stopped by a full disk says: what it kept, and how to go on."""
    try:
        manifest = load_manifest(directory)
        kept = f"the {manifest.rows} samples of its {len(manifest.shards)} listed shards are kept"
    except ManifestError:
        kept = "nothing was committed"
    free = shutil.disk_usage(directory).free
    return (f"the disk holding {directory} is full ({error.strerror or error}; {free:,} bytes free now); the job "
            f"stopped: {kept}, and no partial shard is listed. Free space (`specmill factory plan` with the "
            f"same job says how much the finished data set needs) and run the same job again: it resumes, "
            f"each row exactly once")


def _record(src: SourceRow, stage: str, reason: str, sample_id: str | None = None) -> QuarantineRecord:
    return QuarantineRecord(file=src.file, row=src.row, index=src.index, stage=stage, reason=reason, sample_id=sample_id)


# --------------------------------------------------------------------------- entry point


def run_job(job: JobConfig, *, media: MediaPaths, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a job to completion; return its report. Starts a local Ray unless the
    job names an address (or Ray is already initialised). `media`: which files the rows' media
    paths may name; `MediaPaths()` for the user's own (`factory run`), the job service confines
    them to its roots. Refuses, before anything starts, a job whose disk plan (factory.plan)
    needs more than the free space, unless output.ignore_free_space is set."""
    existing = _existing_report(job)
    if existing is not None:
        log.info("%s is already complete; nothing to do", job.output.dir)
        return existing
    _check_thinking(job)
    _check_free_space(job, media, show_progress)
    job.output.dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _ray_session(job):
        ray_s = round(time.monotonic() - started, 1)
        _check_resources(job)
        capture = choose_capture_backend(job)
        log.info("capture backend: %s (%s); forward pass in %s", capture.name, capture.reason, capture.compute_dtype)
        pipeline = build_pipeline(job, media=media, capture=capture)
        try:
            pipeline.timings["ray_init_s"] = ray_s
            return pipeline.run(show_progress=show_progress)
        finally:
            pipeline.shutdown()


def _existing_report(job: JobConfig) -> dict[str, Any] | None:
    """Fail fast, before any server starts, if the output directory belongs to another job;
    the finished report if it is already complete."""
    try:
        manifest = load_manifest(job.output.dir)
    except ManifestError:
        if (job.output.dir / "manifest.json").exists():
            raise
        return None
    generation = job.sampling.generation_settings()
    if manifest.info.get("generation", generation) != generation:
        raise FactoryError(f"{job.output.dir} was made with other generation settings "
                           f"({manifest.info['generation']}, now {generation}); use a new output.dir")
    if not manifest.complete:
        return None
    report = manifest.info.get("report") or {}
    rows, done_rows = count_rows(job.input), report.get("input_rows")
    if done_rows is None or rows <= done_rows:
        return report
    # The job's inputs grew (rows appended, a file added, max_samples raised): reopen the data
    # set; the run skips every sample and quarantined row it already holds.
    log.info("%s is complete for %d input rows, the job now has %d: reopening it for the new rows",
             job.output.dir, done_rows, rows)
    manifest.complete = False
    save_manifest(job.output.dir, manifest)
    return None


def _check_thinking(job: JobConfig) -> None:
    """sampling.thinking only means something where the template has a thinking switch."""
    if job.sampling.thinking is None:
        return
    from factory.targets import Frontend

    template = Frontend.load(job.capture.target_config(job.model)).chat_template
    if "enable_thinking" not in template:
        raise JobConfigError(f"sampling.thinking is set, but the chat template of {job.model} has no thinking "
                             f"switch (enable_thinking); leave sampling.thinking out")


def _check_free_space(job: JobConfig, media: MediaPaths, show_progress: bool) -> None:
    """Refuse a job whose disk plan needs more than the free space where it goes."""
    if job.output.ignore_free_space:
        log.info("output.ignore_free_space is set: the data set's size is not checked against the free space")
        return
    plan = plan_job(job, media=media, show_progress=show_progress)
    if not plan.fits:
        raise FactoryError(plan.refusal())
    log.info("disk plan: %s bytes to write (%s), %s bytes free in %s", f"{plan.needed_bytes:,}",
             "exact" if plan.exact else "an upper bound", f"{plan.free_bytes:,}", plan.volume)


@contextlib.contextmanager
def _ray_session(job: JobConfig) -> Iterator[None]:
    """Ray for the job: the one this process is already in; the cluster at `ray.address`, with
    its own auth; or a local cluster started here with a token of its own (a temporary file,
    see `factory.ray_auth`: the user's ~/.ray is neither needed nor touched). Shut down after,
    unless it was already running."""
    import ray

    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        cfg = job.ray
        if cfg.address is not None:
            ray.init(address=cfg.address)
        else:
            token_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specmill-ray-")))
            stack.enter_context(token_in_process(own_token(token_dir)))
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False,
                     object_store_memory=None if cfg.object_store_mb is None else cfg.object_store_mb << 20)
        stack.callback(ray.shutdown)
        yield


def _check_resources(job: JobConfig) -> None:
    """On a local Ray, actors that cannot all be placed would wait forever: say so instead."""
    import ray

    if job.ray.address is not None:
        return  # a cluster may scale up to fit
    servers = 0 if job.sampling.keep_original_answers or job.servers.urls else job.servers.replicas
    captures = job.ray.capture_actors
    need = {"CPU": servers * job.servers.num_cpus + captures * job.capture.num_cpus,
            "GPU": servers * job.servers.num_gpus + captures * job.capture.num_gpus}
    have = ray.cluster_resources()
    for resource, amount in need.items():
        if amount > have.get(resource, 0) + 1e-9:
            raise FactoryError(f"the job's actors need {amount:g} {resource} (servers.replicas x servers.num_"
                               f"{resource.lower()}s + ray.capture_actors x capture.num_{resource.lower()}s) but "
                               f"the local Ray has {have.get(resource, 0):g}; lower them or raise ray.num_cpus")
