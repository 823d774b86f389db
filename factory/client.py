"""The job service's client: `specmill submit JOB.toml --url URL [--token T] [--wait]`.

The job file is the same as `specmill factory run` takes; relative paths in it are made
absolute against the file's directory (flags: against the working directory) before they
are sent, since the service resolves relative paths against its data root. A submit is
retried on connection errors under one Idempotency-Key, so a retry never makes a second job.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("specmill.client")

TOKEN_ENV = "SPECMILL_API_TOKEN"
TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_S = 10.0  # `submit --wait` prints a line at least this often


class ServiceError(RuntimeError):
    """The service refused a request or could not be reached; the message has its answer."""


@dataclass(kw_only=True, slots=True)
class ServiceClient:
    url: str
    token: str
    timeout_s: float = 30.0
    retries: int = 5  # submit attempts on transport errors

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be the service's http(s) base URL, got {self.url!r}")
        if not self.token:
            raise ValueError(f"no API token: pass --token or set {TOKEN_ENV}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=self.timeout_s, **kwargs)

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or secrets.token_hex(16)
        for attempt in range(self.retries):
            try:
                response = self._request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as e:
                if attempt == self.retries - 1:
                    raise ServiceError(f"cannot reach {self.url}: {e}") from None
                time.sleep(min(2.0**attempt, 10.0))
                continue
            return _json(response)
        raise AssertionError("unreachable")

    def job(self, job_id: str) -> dict[str, Any]:
        return _json(self._request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _json(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def manifest(self, job_id: str) -> dict[str, Any]:
        return _json(self._request("GET", f"/v1/jobs/{job_id}/manifest"))

    def wait(self, job_id: str, *, poll_s: float = 1.0, on_update: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Poll until the job ends; `on_update` sees every answer."""
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL:
                return job
            time.sleep(poll_s)


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:500]
        if isinstance(detail, list):  # 422: one line per bad field
            detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        raise ServiceError(f"{response.status_code}: {detail}")
    return response.json()


def submit_body(job_file: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/jobs body: the job file's tables under `job`, given flags as flat keys."""
    body: dict[str, Any] = {}
    if job_file is not None:
        try:
            tables = tomllib.loads(job_file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{job_file}: not valid TOML ({e})") from None
        body["job"] = _absolute_paths(tables, job_file.resolve().parent)
    for name, value in flags.items():
        if value is None:
            continue
        if name in ("model", "out"):
            value = str(Path(value).expanduser().absolute())
        elif name == "prompts":
            value = [str(Path(p).expanduser().absolute()) for p in value]
        body[name] = value
    return body


def _absolute_paths(tables: dict[str, Any], base: Path) -> dict[str, Any]:
    def absolute(p: Any) -> Any:
        return str(base / Path(p).expanduser()) if isinstance(p, str) else p

    out = dict(tables)
    if "model" in out:
        out["model"] = absolute(out["model"])
    if isinstance(out.get("input"), dict) and isinstance(out["input"].get("paths"), list):
        out["input"] = {**out["input"], "paths": [absolute(p) for p in out["input"]["paths"]]}
    if isinstance(out.get("output"), dict) and "dir" in out["output"]:
        out["output"] = {**out["output"], "dir": absolute(out["output"]["dir"])}
    return out


def progress_line(job: dict[str, Any], elapsed_s: float) -> str:
    """One line of a job's progress: rows done of the total, each stage's count and rate, ETA."""
    head = f"{job['id']} {job['state']} {elapsed_s:4.0f} s: "
    if job.get("total") is None:
        return head + ("queued" if job["state"] == "queued" else
                       "starting (Ray, the vLLM server and the target load before the first row)")
    stages = job.get("stages") or {}
    parts = [f"{job['done']}/{job['total']} rows"]
    for name, label in (("resample", "resampled"), ("capture", "captured")):
        stage = stages.get(name)
        if stage:
            rate = stage.get("tokens_per_s")
            parts.append(f"{label} {stage['samples']}" + (f" ({rate:.0f} tok/s)" if rate else ""))
    parts.append(f"written {job['samples_written']} ({job['tokens']} tokens), quarantined {job['samples_quarantined']}")
    if job.get("eta_s") is not None and job["state"] == "running":
        parts.append(f"ETA {job['eta_s']:.0f} s")
    return head + " | ".join(parts)


def run_submit(url: str, token: str | None, job_file: Path | None, flags: dict[str, Any], *, wait: bool,
               idempotency_key: str | None, echo: Callable[[str], None]) -> int:
    """`specmill submit`: print the job id; with `wait`, progress until it ends (exit 1 unless it succeeded)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    client = ServiceClient(url=url, token=token or os.environ.get(TOKEN_ENV, ""))
    job = client.submit(submit_body(job_file, flags), idempotency_key)
    echo(job["id"])
    if not wait:
        return 0
    started, last, last_at = time.monotonic(), None, -HEARTBEAT_S

    def show(update: dict[str, Any]) -> None:
        # A line when the counts move (at most one every 2 s) and at least every HEARTBEAT_S,
        # so that a wait is never silent.
        nonlocal last, last_at
        elapsed = time.monotonic() - started
        counts = tuple(update.get(k) for k in ("state", "done", "samples_written", "samples_quarantined"))
        if (counts != last and elapsed - last_at >= 2.0) or elapsed - last_at >= HEARTBEAT_S:
            echo(progress_line(update, elapsed))
            last, last_at = counts, elapsed

    job = client.wait(job["id"], on_update=show)
    if job["state"] != "succeeded":
        echo(f"job {job['id']} {job['state']}" + (f": {job['error']}" if job.get("error") else ""))
        return 1
    echo(job["out"])
    return 0
