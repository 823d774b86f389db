"""The job store on PostgreSQL, the backend for several service replicas: a throwaway cluster
(initdb + pg_ctl on a free port, as the `postgres` user when run as root), skipped with the
reason when the server binaries are absent (`apt-get install -y postgresql`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from factory.service.app import create_app
from factory.service.settings import ApiToken, ServiceSettings, SettingsError
from factory.service.store import JobStore
from shared.vllm_launch import free_port

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's layout, newest first
TOKEN = "pg-token-0123456789abcdef"


def _pg_tool(name: str) -> str | None:
    return next((str(d / name) for d in PG_BINS if (d / name).is_file()), None) or shutil.which(name)


@pytest.fixture(scope="module")
def pg_url() -> str:
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install -y postgresql")
    as_user: list[str] = []
    # Not under pytest's temp tree: pytest keeps that 0700 for root, out of the postgres user's reach.
    base = Path(tempfile.mkdtemp(prefix="specmill-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    try:
        _run([*as_user, initdb, "-D", str(data), "-U", "specmill", "--auth=trust", "-E", "UTF8"])
        _run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "pg.log"), "-w", "-o",
              f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"])
        yield f"postgresql://specmill@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout[-2000:]} {done.stderr[-2000:]}"


@pytest.fixture()
def fresh_db(pg_url) -> str:
    """The same database, emptied: each test starts without jobs."""
    store = JobStore(pg_url)
    with store.tx() as cur:
        cur.execute("DELETE FROM jobs")
    store.close()
    return pg_url


def test_postgresql_without_a_shared_ray_cluster_is_refused(fresh_db, tmp_path):
    with pytest.raises(SettingsError, match="must share one Ray cluster"):
        ServiceSettings(data_root=tmp_path, db=fresh_db, tokens=(ApiToken(name="pg", token=TOKEN),))


def test_two_replicas_claiming_at_once_never_run_more_than_the_limit(fresh_db):
    replicas = [JobStore(fresh_db), JobStore(fresh_db)]
    for i in range(6):
        replicas[i % 2].create(owner="u", idempotency_key=None, request_sha256="x", spec={}, out_dir=f"/o/{i}",
                               job_id=f"job{i:013d}")
    claimed: list[list[str]] = []
    barrier = threading.Barrier(8)

    def claim(store: JobStore) -> None:
        barrier.wait()
        claimed.append([j.id for j in store.claim(2)])

    threads = [threading.Thread(target=claim, args=(replicas[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for batch in claimed for i in batch]
    assert sorted(ids) == ["job0000000000000", "job0000000000001"], claimed  # the two oldest, once each
    assert replicas[0].counts()["running"] == 2 and replicas[1].counts()["queued"] == 4
    for store in replicas:
        store.close()


def test_a_running_attempt_changes_only_once_across_replicas(fresh_db):
    a, b = JobStore(fresh_db), JobStore(fresh_db)
    a.create(owner="u", idempotency_key=None, request_sha256="x", spec={}, out_dir="/o", job_id="j" * 16)
    (job,) = a.claim(1)
    assert a.next_attempt(job) and not b.next_attempt(job)  # b saw the same attempt: it loses
    assert b.get(job.id).attempt == 2 and b.get(job.id).submission_id == f"specmill-{job.id}-2"
    a.close()
    b.close()


def test_the_service_on_postgres_keeps_jobs_and_idempotency_across_restarts(fresh_db, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    spec = {"model": "model", "prompts": "p.jsonl", "max_samples": 2}
    headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k1"}

    def settings() -> ServiceSettings:
        # Dispatch paused: the (shared) Ray cluster every replica must name is never called here.
        return ServiceSettings(data_root=tmp_path, db=fresh_db, tokens=(ApiToken(name="pg", token=TOKEN),),
                               max_concurrent_jobs=0, ray_address="http://127.0.0.1:9")

    with TestClient(create_app(settings())) as c:
        first = c.post("/v1/jobs", json=spec, headers=headers)
        assert first.status_code == 201, first.text
    assert not (tmp_path / ".specmill" / "jobs.db").exists()  # nothing went to SQLite
    with TestClient(create_app(settings())) as c:
        again = c.post("/v1/jobs", json=spec, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert c.get("/healthz").json()["jobs"]["queued"] == 1
