"""How the service hands jobs to Ray: each job is a Ray job (the Ray Jobs API).

Why Ray jobs, not worker processes of the service: a Ray job's driver
(`python -m factory.service.worker SPEC`) is started and supervised by the cluster, not by
the service, so the service can die, restart or run as several replicas while jobs keep
running; Ray keeps each job's status, exit message and log, and stops it on request; and
the same code drives a remote cluster (KubeRay, `--ray-address http://head:8265`) unchanged.
The service itself only makes HTTP calls to the cluster's job API.

Without `--ray-address` the service starts a local cluster (`ray start --head --block` in
its own process group, state in data_root/.specmill/ray/cluster.json) the first time it has
a job to run, and finds the same cluster again after a restart. The cluster outlives the
service so that running jobs keep running; the service stops it on shutdown only when no
job is running. The cluster authenticates with a token of its own
(data_root/.specmill/ray/ray-auth-token, see `factory.ray_auth`), never the user's ~/.ray.

A cluster that cannot start is retried with a growing pause; each failure carries the last
lines of `ray start`'s log, which the dispatcher reports once it has waited long enough.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.ray_auth import cluster_env, own_token
from factory.service.settings import TOKENS_ENV
from shared.vllm_launch import free_port

log = logging.getLogger("specmill.service.ray")

RUNNING, SUCCEEDED, FAILED, STOPPED = "running", "succeeded", "failed", "stopped"


class RayUnavailable(RuntimeError):
    """The cluster's job API cannot be reached (yet)."""


@dataclass(kw_only=True, slots=True)
class RayJobStatus:
    state: str  # running (also Ray's PENDING) | succeeded | failed | stopped
    message: str


class LocalRayCluster:
    """A single-node Ray cluster the service starts and finds again after a restart."""

    def __init__(self, state_dir: Path, num_cpus: int | None = None, start_timeout_s: float = 120.0,
                 max_retry_pause_s: float = 30.0):
        self.state_dir = state_dir
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.max_retry_pause_s = max_retry_pause_s
        self.state_file = state_dir / "cluster.json"
        self._failures = 0  # failed starts in a row
        self._retry_at = 0.0  # monotonic time before which a failed start is not tried again
        self._last_error: RayUnavailable | None = None

    def token_path(self) -> Path:
        """The cluster's auth token file (made on first use); the service's own client reads it too."""
        return own_token(self.state_dir)

    def dashboard_url(self) -> str:
        """The running cluster's job API, starting the cluster if there is none. After a failed
        start, calls within the retry pause (1, 2, 4 ... max_retry_pause_s s) raise that failure
        again instead of starting `ray start` once a tick."""
        state = self._alive_state()
        if state is not None:
            return state["dashboard_url"]
        if self._last_error is not None and time.monotonic() < self._retry_at:
            raise self._last_error
        try:
            state = self._start()
        except RayUnavailable as e:
            self._failures += 1
            self._retry_at = time.monotonic() + min(2.0 ** (self._failures - 1), self.max_retry_pause_s)
            self._last_error = e
            raise
        self._failures, self._last_error = 0, None
        return state["dashboard_url"]

    def running(self) -> bool:
        return self._alive_state() is not None

    def stop(self) -> None:
        state = self._alive_state()
        if state is None:
            return
        log.info("stopping the local Ray cluster (process group %d)", state["pid"])
        _kill_group(state["pid"])
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(state["temp_dir"], ignore_errors=True)

    def _alive_state(self) -> dict[str, Any] | None:
        import psutil

        try:
            state = json.loads(self.state_file.read_text())
            alive = psutil.Process(state["pid"]).create_time() == state["create_time"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, psutil.Error):
            return None
        return state if alive else None

    def _start(self) -> dict[str, Any]:
        import psutil

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._remove_dead_temp_dir()
        # A temp dir of its own: `ray.init()` elsewhere on this machine looks for a cluster to
        # join in /tmp/ray, and must not find this one. Short: Ray's socket paths must fit 107 bytes.
        temp_dir = Path("/tmp") / f"specmill-ray-{os.getpid()}-{int(time.time())}"
        ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                                "--dashboard-agent-listen-port", "--metrics-export-port",
                                                "--runtime-env-agent-port")}
        argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", "--disable-usage-stats",
                *(f"{flag}={port}" for flag, port in ports.items())]
        if self.num_cpus is not None:
            argv.append(f"--num-cpus={self.num_cpus}")
        log_path = self.state_dir / "ray-start.log"
        # Job drivers inherit the cluster's environment: the service's API tokens stay out of it.
        env = cluster_env(self.token_path(), {k: v for k, v in os.environ.items() if k != TOKENS_ENV})
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{ports['--dashboard-port']}"
        log.info("starting a local Ray cluster (pid %d, job API %s, log %s)", proc.pid, url, log_path)
        deadline = time.monotonic() + self.start_timeout_s
        # Up = `ray start` says every process started *and* the job API answers: the GCS and the
        # dashboard come up before the raylet, whose failure then ends `ray start`.
        while not (_says_started(log_path, log_start) and _job_api_answers(url)):
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_group(proc.pid)
                how = f"exit {proc.poll()}" if proc.poll() is not None else f"not up after {self.start_timeout_s:g} s"
                raise RayUnavailable(f"the local Ray cluster did not start ({how}); the end of {log_path}:\n"
                                     f"{_tail(log_path)}")
            time.sleep(0.5)
        state = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "dashboard_url": url,
                 "gcs_address": f"127.0.0.1:{ports['--port']}", "temp_dir": str(temp_dir)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)
        return state


    def _remove_dead_temp_dir(self) -> None:
        """A cluster that died (killed, machine restarted) leaves its session files behind."""
        try:
            old = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if isinstance(old.get("temp_dir"), str) and old["temp_dir"].startswith("/tmp/specmill-ray-"):
            shutil.rmtree(old["temp_dir"], ignore_errors=True)


def _says_started(log_path: Path, offset: int) -> bool:
    with open(log_path, "rb") as f:
        f.seek(offset)
        return b"Ray runtime started." in f.read()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read it: {e})"
    return "\n".join(line for line in text.splitlines()[-lines:])


def _job_api_answers(url: str) -> bool:
    import httpx

    try:
        # 401 counts: the API is up and asks for the cluster token, which the SDK sends.
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code in (200, 401)
    except httpx.HTTPError:
        return False


def _kill_group(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the cluster's process group, SIGKILL what is left after `grace_s` (Ray's GCS
    ignores SIGTERM while it drains)."""
    import psutil

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(p.info["status"] != psutil.STATUS_ZOMBIE for p in psutil.process_iter(["status"])
                   if _pgid(p.pid) == pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class RayJobs:
    """The cluster's job API: submit, status, stop, log tail (by submission id)."""

    def __init__(self, *, address: str | None, local: LocalRayCluster | None):
        if (address is None) == (local is None):
            raise ValueError("RayJobs takes a dashboard address or a local cluster, not both")
        self.address = address
        self.local = local
        self._client: Any = None
        self._client_url: str | None = None

    def client(self) -> Any:
        url = self.address or self.local.dashboard_url()
        if self._client is None or url != self._client_url:
            # A local cluster's token reaches this client through the environment the service
            # sets for its lifetime (`factory.ray_auth.token_in_process`).
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(url)
            except (ConnectionError, RuntimeError) as e:
                raise RayUnavailable(f"Ray job API at {url}: {e}") from None
            self._client_url = url
        return self._client

    def submit(self, submission_id: str, spec_path: Path) -> None:
        """Start the job's driver on the cluster; submitting an id twice is a no-op."""
        entrypoint = f"{sys.executable} -m factory.service.worker {spec_path}"
        try:
            self.client().submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                     metadata={"specmill_spec": str(spec_path)})
        except RuntimeError as e:
            if "already exists" in str(e):
                return
            raise RayUnavailable(f"submitting {submission_id}: {e}") from None
        log.info("submitted %s to Ray", submission_id)

    def status(self, submission_id: str) -> RayJobStatus | None:
        """The job's status, or None when the cluster has never seen it (a new cluster)."""
        try:
            info = self.client().get_job_info(submission_id)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise RayUnavailable(f"status of {submission_id}: {e}") from None
        except (ConnectionError, OSError) as e:
            raise RayUnavailable(f"status of {submission_id}: {e}") from None
        state = {"PENDING": RUNNING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED,
                 "STOPPED": STOPPED}[str(info.status.value)]
        return RayJobStatus(state=state, message=info.message or "")

    def stop(self, submission_id: str) -> None:
        try:
            self.client().stop_job(submission_id)
        except RuntimeError as e:
            log.warning("stopping %s: %s", submission_id, e)

    def log_tail(self, submission_id: str, lines: int = 30) -> str:
        try:
            text = self.client().get_job_logs(submission_id)
        except (RuntimeError, ConnectionError, OSError) as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])
