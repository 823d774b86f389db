"""A job service whose local Ray cluster cannot start: jobs fail with the cause within the
bound, /healthz says why, nothing waits forever. The cluster is made unstartable for real: the
service's `LocalRayCluster` runs the real `ray start`, asked for -1 CPUs (which the service's
own settings refuse, so the test hands the cluster to the app directly)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from factory.service.app import create_app
from factory.service.ray_runner import LocalRayCluster, RayJobs
from factory.service.settings import ApiToken, ServiceSettings

TOKEN = "unavailable-token-0123456789"
BOUND_S = 6.0
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def unstartable_service(tmp_path: Path, *, bound_s: float, max_retry_pause_s: float):
    """A service on a data root holding a tiny model directory and one prompt, whose local
    cluster asks `ray start` for -1 CPUs."""
    data, model = tmp_path / "data", tmp_path / "data" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (data / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    settings = ServiceSettings(data_root=data, tokens=(ApiToken(name="alice", token=TOKEN),),
                               ray_unavailable_timeout_s=bound_s, poll_interval_s=0.2)
    local = LocalRayCluster(settings.state_dir / "ray", num_cpus=-1, max_retry_pause_s=max_retry_pause_s)
    body = {"model": str(model), "prompts": "p.jsonl", "max_samples": 1, "keep_original_answers": True}
    return settings, TestClient(create_app(settings, ray=RayJobs(address=None, local=local))), body


def test_a_job_fails_with_ray_starts_log_when_the_local_cluster_cannot_start(tmp_path: Path):
    settings, app, body = unstartable_service(tmp_path, bound_s=BOUND_S, max_retry_pause_s=2.0)
    with app as client:
        job = client.post("/v1/jobs", headers=HEADERS, json=body).json()
        started = time.monotonic()
        while (state := client.get(f"/v1/jobs/{job['id']}", headers=HEADERS).json())["state"] != "failed":
            assert time.monotonic() - started < BOUND_S + 90, f"still {state['state']} long after the bound"
            time.sleep(0.5)
        waited = time.monotonic() - started
        health = client.get("/healthz").json()

    assert waited >= BOUND_S
    assert "Ray was unavailable" in state["error"] and "did not start" in state["error"]
    # The cause itself, from ray start's log, not only a pointer to it.
    assert "Resource quantities must be nonnegative" in state["error"]
    assert health["status"] == "degraded" and health["ray"].startswith("unavailable")
    assert "Resource quantities must be nonnegative" in health["ray"]
    # The cluster's token was made by specmill, private, under the data root.
    token = settings.state_dir / "ray" / "ray-auth-token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64


def test_a_job_submitted_after_the_bound_fails_at_its_first_try(tmp_path: Path):
    _, app, body = unstartable_service(tmp_path, bound_s=2.0, max_retry_pause_s=60.0)
    with app as client:
        first = client.post("/v1/jobs", headers=HEADERS, json={**body, "out": "a"}).json()
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{first['id']}", headers=HEADERS).json()["state"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        second = client.post("/v1/jobs", headers=HEADERS, json={**body, "out": "b"}).json()
        started = time.monotonic()
        while (state := client.get(f"/v1/jobs/{second['id']}", headers=HEADERS).json())["state"] != "failed":
            assert time.monotonic() - started < 10, "a job after the bound waited again"
            time.sleep(0.2)
    assert "did not start" in state["error"]
