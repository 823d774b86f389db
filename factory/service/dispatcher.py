"""The service's background loop: claim queued jobs, hand them to Ray, follow them to the end.

Each tick (every `poll_interval_s`):
  1. every running job is reconciled with Ray by its submission id (`specmill-<id>-<attempt>`):
     not yet submitted -> submit (a cancel that came first wins); unknown to a cluster it was
     submitted to -> the cluster was replaced, so the next attempt is submitted and resumes
     from the committed output; finished -> the final state, report or error is recorded;
     cancel requested -> Ray is asked to stop it.
  2. queued jobs are claimed, oldest first, up to `max_concurrent_jobs` running in all.
Everything it decides is written to the store first, so a restarted service (or another
replica) carries on from the database alone.

When Ray cannot be reached (a local cluster that will not start, a remote one that is down),
jobs wait for it at most `ray_unavailable_timeout_s`, then fail with the cause in `error`;
until Ray answers again, a newly claimed job fails at its first try.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from factory.service.ray_runner import FAILED, STOPPED, SUCCEEDED, RayJobs, RayUnavailable
from factory.service.settings import ServiceSettings
from factory.service.store import JobRow, JobStore

log = logging.getLogger("specmill.service.dispatcher")


def spec_path(settings: ServiceSettings, job_id: str) -> Path:
    return settings.state_dir / "jobs" / job_id / "spec.json"


def write_spec(settings: ServiceSettings, job: JobRow) -> Path:
    """The worker's input: the resolved tables and the roots they must stay in."""
    path = spec_path(settings, job.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    roots = {"data_root": str(settings.data_root), "input_roots": [str(r) for r in settings.input_roots]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job_id": job.id, "job": job.spec, "roots": roots}, indent=1))
    tmp.replace(path)
    return path


class Dispatcher:
    def __init__(self, settings: ServiceSettings, store: JobStore, ray: RayJobs):
        self.settings = settings
        self.store = store
        self.ray = ray
        self.ray_state = "idle"  # idle (nothing to run yet) | up | unavailable: <why>
        self._unavailable_since: float | None = None  # monotonic time of the first failure in a row
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="specmill-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except RayUnavailable as e:
                self._ray_down(e)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick; the next one retries
                log.exception("dispatcher tick failed; retrying")
            self._stop.wait(self.settings.poll_interval_s)

    def tick(self) -> None:
        for job in self.store.active():
            self._reconcile(job)
        if self.settings.max_concurrent_jobs > 0:
            for job in self.store.claim(self.settings.max_concurrent_jobs):
                log.info("job %s claimed (attempt %d)", job.id, job.attempt)
                self._reconcile(job)

    def _ray_up(self) -> None:
        self.ray_state, self._unavailable_since = "up", None

    def _ray_down(self, error: RayUnavailable) -> None:
        now = time.monotonic()
        if self._unavailable_since is None:
            self._unavailable_since = now
        waited, bound = now - self._unavailable_since, self.settings.ray_unavailable_timeout_s
        if self.ray_state != f"unavailable: {error}":
            log.warning("Ray is unavailable (jobs wait up to %.0f s, %.0f s so far): %s", bound, waited, error)
        self.ray_state = f"unavailable: {error}"
        if waited < bound:
            return
        for job in self.store.active():
            self.store.finish(job, "failed", error=f"Ray was unavailable for {waited:.0f} s "
                                                   f"(ray_unavailable_timeout_s = {bound:g}): {error}")
            log.error("job %s failed: Ray unavailable for %.0f s", job.id, waited)

    def _reconcile(self, job: JobRow) -> None:
        if not job.submitted:
            if job.cancel_requested:
                self.store.finish(job, "cancelled")
                return
            self.ray.submit(job.submission_id, write_spec(self.settings, job))
            self._ray_up()
            self.store.mark_submitted(job)
            return
        status = self.ray.status(job.submission_id)
        self._ray_up()
        if status is None:
            log.warning("job %s: Ray does not know %s (the cluster was replaced); resuming it as attempt %d",
                        job.id, job.submission_id, job.attempt + 1)
            self.store.next_attempt(job)
        elif status.state == SUCCEEDED:
            self.store.finish(job, "succeeded", report=_report(Path(job.out_dir)))
            log.info("job %s succeeded", job.id)
        elif status.state == FAILED:
            error = f"{status.message}\n{self.ray.log_tail(job.submission_id)}".strip()
            self.store.finish(job, "failed", error=error)
            log.info("job %s failed", job.id)
        elif status.state == STOPPED:
            self.store.finish(job, "cancelled" if job.cancel_requested else "failed",
                              error=None if job.cancel_requested else f"stopped outside the service: {status.message}")
        elif job.cancel_requested:
            self.ray.stop(job.submission_id)


def _report(out_dir: Path) -> dict[str, Any] | None:
    from shared.manifest import ManifestError, load_manifest

    try:
        return load_manifest(out_dir).info.get("report")
    except ManifestError:
        return None
