"""What the API takes and returns, one schema per direction (`JobCreate` in, `JobPublic` out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from factory.service.store import JobRow

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCreate(BaseModel):
    """A factory job, as `specmill factory run` takes it: the job file's tables under `job`,
    and flat keys like its flags on top (they override the tables key by key)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="target model directory (inside an allowed root)")
    prompts: list[str] | str | None = Field(None, description="JSONL/Parquet files or directories")
    out: str | None = Field(None, description="output data set directory inside the data root "
                                              "(default: out/<job id>)")
    max_samples: int | None = Field(None, ge=1, description="use the first N input rows")
    max_tokens: int | None = Field(None, ge=1, description="max tokens per answer")
    temperatures: list[float] | None = Field(None, description="the temperature mix")
    keep_original_answers: bool | None = Field(None, description="render the data set's own answers; no vLLM")
    ignore_free_space: bool | None = Field(None, description="run the job even when its disk plan exceeds the "
                                                             "free space where it goes (refused otherwise)")
    capture_backend: Literal["auto", "vllm", "transformers"] | None = Field(
        None, description="what runs the target for hidden states (auto: vllm for text targets vLLM serves)")
    job: dict[str, Any] | None = Field(None, description="the job file's tables (see factory/job.py), as JSON")


class StageProgress(BaseModel):
    samples: int = 0
    per_s: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None


class Throughput(BaseModel):
    samples_per_s: float | None = None
    generated_tokens_per_s: float | None = None
    captured_tokens_per_s: float | None = None


class JobPublic(BaseModel):
    id: str
    owner: str
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    attempts: int
    model: str | None
    prompts: list[str]
    out: str
    max_samples: int | None
    max_tokens: int | None
    total: int | None = Field(None, description="input rows the job covers")
    done: int | None = Field(None, description="input rows finished (written, quarantined or done before)")
    eta_s: float | None = None
    stages: dict[str, StageProgress] = Field(default_factory=dict)
    samples_written: int = 0
    samples_quarantined: int = 0
    tokens: int = 0
    throughput: Throughput = Field(default_factory=Throughput)
    error: str | None = None

    @classmethod
    def from_row(cls, row: JobRow) -> JobPublic:
        spec = row.spec
        view = cls(id=row.id, owner=row.owner, state=row.state, created_at=row.created_at,
                   started_at=row.started_at, finished_at=row.finished_at, cancel_requested=row.cancel_requested,
                   attempts=row.attempt, model=spec.get("model"), prompts=spec.get("input", {}).get("paths", []),
                   out=row.out_dir, max_samples=spec.get("input", {}).get("max_samples"),
                   max_tokens=spec.get("sampling", {}).get("max_tokens"), error=row.error)
        if row.state != "queued":
            view._add_progress(_read_json(Path(row.out_dir) / "progress.json"))
        if row.report:
            view.samples_written = row.report.get("samples", view.samples_written)
            view.samples_quarantined = row.report.get("quarantined", view.samples_quarantined)
            view.tokens = row.report.get("tokens", view.tokens)
        return view

    def _add_progress(self, progress: dict[str, Any] | None) -> None:
        """From the pipeline's progress.json (rewritten atomically every 2 s while it runs)."""
        if not progress:
            return
        self.total, self.done, self.eta_s = progress.get("total"), progress.get("done"), progress.get("eta_s")
        stages = progress.get("stages", {})
        for name, s in stages.items():
            self.stages[name] = StageProgress(samples=s.get("samples", 0), per_s=s.get("per_s"),
                                              tokens=s.get("tokens", s.get("generated_tokens")),
                                              tokens_per_s=s.get("tokens_per_s"))
        self.samples_written = stages.get("write", {}).get("samples", 0)
        self.samples_quarantined = stages.get("quarantine", {}).get("samples", 0)
        self.tokens = stages.get("capture", {}).get("tokens", 0)
        self.throughput = Throughput(samples_per_s=stages.get("write", {}).get("per_s"),
                                     generated_tokens_per_s=stages.get("resample", {}).get("tokens_per_s"),
                                     captured_tokens_per_s=stages.get("capture", {}).get("tokens_per_s"))


class JobList(BaseModel):
    jobs: list[JobPublic]
    offset: int
    limit: int


class QuarantinePage(BaseModel):
    total: int = Field(description="quarantined rows committed so far")
    offset: int
    limit: int
    items: list[dict[str, Any]] = Field(description="file, row, index, sample_id, stage, reason")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    db: str
    ray: str
    jobs: dict[str, int]


class ErrorDetail(BaseModel):
    detail: Any


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
