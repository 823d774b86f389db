"""Jobs through the real service: `specmill serve` as a subprocess on loopback, a real SQLite
file, a real local Ray cluster the service starts, the default model (keep-original-answers
jobs, so no vLLM; the resampling one is marked slow). The service is SIGKILLed mid-job and
restarted; the Ray cluster is killed under a running job; a running job is cancelled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from factory.default_model import DefaultModelConfig, prepare_default
from factory.prompts import write_chitchat_prompts
from factory.service.ray_runner import LocalRayCluster
from shared.manifest import load_manifest
from shared.vllm_launch import free_port

from dataset_contents import read_back
from processes import kill_marked, new_marker, start_tree

TOKEN = "lifecycle-token-0123456789"
ROWS = 32  # input rows each job covers (max_samples)
# Capture on transformers: these tests are about the service; a vLLM capture server per job would
# add a minute each (the resampling test below keeps the default backend).
SMALL = {"output": {"commit_every": 1}, "capture": {"backend": "transformers"},
         "ray": {"batch_size": 1, "capture_batch": 1, "max_in_flight": 2}}


class Service:
    """`specmill serve` on a free loopback port; start, SIGKILL and start again on one data root."""

    def __init__(self, root: Path, model_root: Path):
        self.root, self.model_root = root, model_root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "serve.log"
        self.marker = new_marker()  # every start's tree: the services, their Ray cluster, vLLM, drivers

    def start(self, *extra: str) -> None:
        env = {**os.environ, "SPECMILL_API_TOKENS": f"tester={TOKEN}"}
        with open(self.log, "a") as log:
            self.proc = start_tree(
                [sys.executable, "-m", "shared.cli", "serve", "--port", str(self.port), "--data-root", str(self.root),
                 "--input-root", str(self.model_root), "--ray-num-cpus", "2", *extra],
                env=env, marker=self.marker, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the service did not start")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, **kw)

    def submit(self, **spec) -> dict:
        r = self.request("POST", "/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, until, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            assert job["state"] not in ("failed", "cancelled") or until(job), job
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting on job {job_id}: {self.job(job_id)}\n"
                             f"{self.log.read_text()[-3000:]}")


def mid_run(out: Path, timeout: float = 400) -> None:
    """Return as soon as the job has committed samples but is not complete (polls the manifest
    every 50 ms: the job's progress reaches the API only every 2 s, too late to catch it running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "manifest.json").exists():
            manifest = load_manifest(out)
            assert not manifest.complete, "the job ended before it could be interrupted"
            if manifest.rows > 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"no samples committed in {out} within {timeout} s")


def ended(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    return prepare_default(DefaultModelConfig(engine_check=False))


@pytest.fixture(scope="module")
def service(tmp_path_factory, smollm_dir):
    root = tmp_path_factory.mktemp("service")
    write_chitchat_prompts(root / "chats.jsonl", 40)
    svc = Service(root, smollm_dir.parent)
    svc.start()
    yield svc
    svc.stop()
    LocalRayCluster(root / ".specmill" / "ray").stop()  # a test that failed mid-job may have left it up
    kill_marked(svc.marker)  # and whatever else it left: it would slow every later test


def job_spec(service: Service, smollm_dir: Path, out: str, **kw) -> dict:
    return {"model": str(smollm_dir), "prompts": "chats.jsonl", "out": out, "max_samples": ROWS,
            "keep_original_answers": True, "job": SMALL, **kw}


def contents(out: Path) -> dict:
    manifest, samples, quarantine = read_back(out)
    seen = Counter(s["source_index"] for s in samples) + Counter(q["index"] for q in quarantine)
    assert sorted(seen) == list(range(ROWS)) and set(seen.values()) == {1}, f"gaps or duplicates: {seen}"
    return {"sample_ids": sorted(s["sample_id"] for s in samples), "tokens": manifest.tokens,
            "quarantined": sorted(q["index"] for q in quarantine)}


@pytest.fixture(scope="module")
def reference(service, smollm_dir) -> dict:
    """An uninterrupted job over HTTP: what every interrupted one must end up as."""
    job = service.submit(**job_spec(service, smollm_dir, "ref"))
    done = service.wait(job["id"], ended)
    return {"job": done, "contents": contents(Path(done["out"]))}


@pytest.mark.slow  # the service and a Ray cluster in their own processes, real jobs run through them
def test_a_submitted_job_runs_on_ray_to_succeeded_with_progress_manifest_and_quarantine(service, reference):
    job = reference["job"]
    assert job["state"] == "succeeded" and job["attempts"] == 1 and job["error"] is None, job
    c = reference["contents"]
    assert job["samples_written"] == len(c["sample_ids"]) > 0 and job["tokens"] == c["tokens"]
    assert job["samples_quarantined"] == len(c["quarantined"]) > 0  # chats with only a user turn
    assert job["total"] == ROWS and job["done"] == ROWS and job["stages"]["capture"]["tokens"] == c["tokens"]
    manifest = service.request("GET", f"/v1/jobs/{job['id']}/manifest").json()
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == len(c["sample_ids"])
    pages = [service.request("GET", f"/v1/jobs/{job['id']}/quarantine", params={"offset": i, "limit": 1}).json()
             for i in range(len(c["quarantined"]) + 1)]
    assert [p["total"] for p in pages] == [len(c["quarantined"])] * len(pages)
    assert sorted(p["items"][0]["index"] for p in pages[:-1]) == c["quarantined"] and pages[-1]["items"] == []
    assert all(p["items"][0]["stage"] in ("read", "render") and p["items"][0]["reason"] for p in pages[:-1])
    assert TOKEN not in service.log.read_text()


@pytest.mark.slow  # the service and a Ray cluster in their own processes, real jobs run through them
def test_a_service_killed_mid_job_finds_the_job_still_running_and_it_finishes_exactly_once(
        service, smollm_dir, reference):
    job = service.submit(**job_spec(service, smollm_dir, "restart"))
    mid_run(Path(job["out"]))
    service.kill()  # SIGKILL: no shutdown, the cluster and the job's driver keep running
    service.start()
    done = service.wait(job["id"], ended)
    assert done["state"] == "succeeded" and done["attempts"] == 1, done  # found again, not run twice
    assert contents(Path(done["out"])) == reference["contents"]


@pytest.mark.slow  # the service and a Ray cluster in their own processes, real jobs run through them
def test_a_job_whose_ray_cluster_died_is_resumed_as_a_new_attempt_exactly_once(service, smollm_dir, reference):
    job = service.submit(**job_spec(service, smollm_dir, "cluster-lost"))
    mid_run(Path(job["out"]))
    service.kill()
    cluster = json.loads((service.root / ".specmill" / "ray" / "cluster.json").read_text())
    os.killpg(cluster["pid"], signal.SIGKILL)  # the cluster and the job's driver die with it
    time.sleep(1)  # the driver notices its cluster is gone
    assert not load_manifest(Path(job["out"])).complete
    service.start()
    done = service.wait(job["id"], ended)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert contents(Path(done["out"])) == reference["contents"]


@pytest.mark.slow  # the service and a Ray cluster in their own processes, real jobs run through them
def test_cancelling_a_running_job_stops_it_and_the_next_queued_job_starts(service, smollm_dir, reference):
    first = service.submit(**job_spec(service, smollm_dir, "cancelled", max_samples=40))
    second = service.submit(**job_spec(service, smollm_dir, "after-cancel", max_samples=4))
    service.wait(first["id"], lambda j: j["state"] == "running" or ended(j))
    assert service.job(second["id"])["state"] == "queued"  # one job at a time by default
    r = service.request("POST", f"/v1/jobs/{first['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    cancelled = service.wait(first["id"], ended, timeout=120)
    assert cancelled["state"] == "cancelled", cancelled
    assert service.wait(second["id"], ended)["state"] == "succeeded"


@pytest.mark.slow
def test_a_resampling_job_over_http_writes_the_targets_own_answers(service, smollm_dir):
    job = service.submit(model=str(smollm_dir), prompts="chats.jsonl", out="resampled", max_samples=4,
                         max_tokens=16, job={"ray": {"batch_size": 2, "capture_batch": 2}})
    done = service.wait(job["id"], ended, timeout=900)
    assert done["state"] == "succeeded", done
    manifest = load_manifest(Path(done["out"]))
    assert manifest.info["generation"]["answers"] == "resampled" and manifest.rows + \
        manifest.info["quarantine"]["rows"] == 4
    assert done["stages"]["resample"]["tokens"] > 0
