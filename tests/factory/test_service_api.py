"""The job service's API against a real app (TestClient) and a real SQLite file, dispatch paused
(`max_concurrent_jobs = 0`), so no job runs: auth, path confinement, validation, bounds,
idempotency, request limits, cancel, durability of the store. Jobs that run on Ray are in
test_service_lifecycle.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from factory.inputs import InputError, normalize, read_rows
from factory.service.app import create_app
from factory.service.dispatcher import write_spec
from factory.service.worker import load_spec
from factory.service.settings import ApiToken, ServiceSettings, SettingsError, load_settings, tokens_from_env

from small_fs import small_filesystem

ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789ab", "admin-token-0123456789"


@pytest.fixture()
def env(tmp_path: Path) -> dict:
    data, models, elsewhere = tmp_path / "data", tmp_path / "models", tmp_path / "elsewhere"
    for d in (data, models / "tiny", elsewhere / "tiny"):
        d.mkdir(parents=True)
    for model in (models / "tiny", elsewhere / "tiny"):
        (model / "config.json").write_text("{}")  # what a job's validation checks; no job runs here
    (data / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (elsewhere / "secret.jsonl").write_text("{}\n")
    return {"data": data, "models": models, "elsewhere": elsewhere, "model": str(models / "tiny")}


def make_settings(env: dict, **kw) -> ServiceSettings:
    tokens = (ApiToken(name="alice", token=ALICE), ApiToken(name="bob", token=BOB),
              ApiToken(name="root", token=ROOT, admin=True))
    return ServiceSettings(data_root=env["data"], input_roots=(env["models"],), tokens=tokens,
                           max_concurrent_jobs=0, **kw)


@pytest.fixture()
def client(env):
    with TestClient(create_app(make_settings(env))) as c:
        yield c


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def spec(env: dict, **kw) -> dict:
    return {"model": env["model"], "prompts": "p.jsonl", "max_samples": 4, "keep_original_answers": True, **kw}


def submit(client, env, token=ALICE, **kw):
    return client.post("/v1/jobs", json=spec(env, **kw), headers=auth(token))


def bad_fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in response.json()["detail"]}


# --------------------------------------------------------------------------- auth


def test_requests_without_a_token_or_with_an_unknown_one_are_401(client, env):
    assert client.get("/v1/jobs").status_code == 401
    assert client.post("/v1/jobs", json=spec(env)).status_code == 401
    r = client.get("/v1/jobs", headers=auth("not-a-token-of-this-service"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_a_job_is_403_for_another_users_token_and_visible_to_its_owner_and_an_admin(client, env):
    job = submit(client, env).json()
    for path in ("", "/manifest", "/quarantine"):
        assert client.get(f"/v1/jobs/{job['id']}{path}", headers=auth(BOB)).status_code == 403
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(BOB)).status_code == 403
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE)).json()["owner"] == "alice"
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(ROOT)).status_code == 200
    assert client.get("/v1/jobs/0123456789abcdef", headers=auth(ALICE)).status_code == 404


def test_a_users_job_list_holds_only_their_jobs(client, env):
    mine = {submit(client, env, out=f"out/a{i}").json()["id"] for i in range(2)}
    theirs = submit(client, env, BOB, out="out/b").json()["id"]
    listed = {j["id"] for j in client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]}
    assert listed == mine
    everyone = {j["id"] for j in client.get("/v1/jobs", headers=auth(ROOT)).json()["jobs"]}
    assert everyone == mine | {theirs}
    queued = client.get("/v1/jobs", params={"state": "succeeded"}, headers=auth(ALICE)).json()["jobs"]
    assert queued == []


def test_no_token_reaches_the_logs(env, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(make_settings(env))) as c:
        submit(c, env)
        c.get("/v1/jobs", headers=auth(BOB))
        c.get("/v1/jobs", headers=auth("wrong-token-wrong-token"))
    assert caplog.records, "the service logged nothing, so this test proves nothing"
    text = caplog.text + repr(make_settings(env))
    assert ALICE not in text and BOB not in text and ROOT not in text and "wrong-token" not in text


def test_tokens_come_from_the_environment_and_weak_ones_are_refused(env, monkeypatch):
    monkeypatch.setenv("SPECMILL_API_TOKENS", f"carol={ALICE}, {BOB}")
    settings = load_settings(None, data_root=env["data"])
    assert [t.name for t in settings.tokens][0] == "carol" and settings.principal(BOB) is not None
    assert settings.principal("nope") is None
    with pytest.raises(SettingsError, match="shorter than 16"):
        tokens_from_env("dave=short")
    monkeypatch.delenv("SPECMILL_API_TOKENS")
    with pytest.raises(SettingsError, match="no API tokens"):
        load_settings(None, data_root=env["data"])


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("field, value", [
    ("out", "../outside"),
    ("out", "/tmp/specmill-elsewhere"),
    ("out", ".specmill/jobs"),
    ("out", "."),
    ("prompts", "../elsewhere/secret.jsonl"),
    ("prompts", "/etc/passwd"),
    ("model", "../elsewhere/tiny"),
])
def test_a_path_outside_the_roots_is_422_naming_the_field(client, env, field, value):
    errors = bad_fields(submit(client, env, **{field: value}))
    assert any(k.startswith(field) for k in errors), errors


def test_a_symlink_that_leads_out_of_the_roots_is_refused(client, env):
    (env["data"] / "link-in").symlink_to(env["elsewhere"])  # data/link-in -> outside
    errors = bad_fields(submit(client, env, prompts="link-in/secret.jsonl", out="link-in/out",
                               model=str(env["data"] / "link-in" / "tiny")))
    assert set(errors) == {"prompts.0", "out", "model"}, errors
    assert "outside the allowed roots" in errors["prompts.0"]


@pytest.mark.parametrize("field", ["prompts", "model", "out"])
def test_a_path_the_file_system_cannot_name_is_422_not_a_server_error(client, env, field):
    # Found by the schemathesis run: a 300-character file name raised ENAMETOOLONG as a 500.
    errors = bad_fields(submit(client, env, **{field: "x" * 300}))
    assert any(k.startswith(field) and "too long" in m for k, m in errors.items()), errors


def test_a_submitted_jobs_worker_reads_row_media_only_inside_the_roots(client, env):
    """From the HTTP submit through the spec file to the rows the worker reads: media paths in
    rows are confined like the job's own paths, and a refused one reads as a missing one."""
    from PIL import Image

    for d in ("data", "elsewhere"):
        Image.new("RGB", (4, 4)).save(env[d] / "cat.png")
    urls = ["cat.png", str(env["elsewhere"] / "cat.png"), str(env["data"] / "no-such.png")]
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                          {"role": "assistant", "content": "A cat."}]} for url in urls]
    (env["data"] / "media.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job_id = submit(client, env, prompts="media.jsonl").json()["id"]
    spec = write_spec(client.app.state.settings, client.app.state.store.get(job_id))

    job, media = load_spec(spec)
    reasons = []
    for row in read_rows(job.input):
        try:
            normalize(row.data, job.input, media)
            reasons.append(None)
        except InputError as e:
            reasons.append(str(e).replace(urls[row.row], "URL"))
    assert reasons == [None, "field messages[0].content[0].image_url.url: image file URL is not readable by this job "
                             "(missing, or outside the service's data and input roots)", reasons[1]]


def test_relative_paths_resolve_inside_the_data_root(client, env):
    job = submit(client, env, out="sets/first").json()
    assert job["out"] == str(env["data"] / "sets" / "first")
    assert job["prompts"] == [str(env["data"] / "p.jsonl")]
    default_out = submit(client, env).json()
    assert default_out["out"] == str(env["data"] / "out" / default_out["id"])


# --------------------------------------------------------------------------- validation and bounds


def test_every_bad_field_is_named_in_one_422(client, env):
    errors = bad_fields(client.post("/v1/jobs", json={"model": "missing-model", "prompts": ["nope.jsonl"],
                                                      "max_tokens": 10**9}, headers=auth(ALICE)))
    assert {"prompts.0", "max_samples", "max_tokens"} <= set(errors), errors
    errors = bad_fields(client.post("/v1/jobs", json={"max_samples": "many", "temperature": 1}, headers=auth(ALICE)))
    assert {"max_samples", "temperature"} <= set(errors), errors


def test_a_job_table_error_names_the_job_key(client, env):
    errors = bad_fields(submit(client, env, job={"sampling": {"top_p": 3.0}}))
    assert "sampling.top_p must be in (0, 1]" in errors["job"]
    errors = bad_fields(submit(client, env, job={"sampling": {"max_token": 3}}))
    assert "unknown key(s) sampling.max_token" in errors["job"]


def test_the_capture_backend_is_a_flat_key_like_the_flag_and_a_bad_one_is_named(client, env):
    assert submit(client, env, capture_backend="transformers").status_code == 201
    assert "capture_backend" in bad_fields(submit(client, env, capture_backend="sglang"))
    errors = bad_fields(submit(client, env, job={"capture": {"backend": "sglang"}}))
    assert "capture.backend must be one of" in errors["job"]


def test_an_unbounded_job_is_refused(env):
    with TestClient(create_app(make_settings(env, max_samples_limit=100, max_tokens_limit=64))) as c:
        errors = bad_fields(c.post("/v1/jobs", json={"model": env["model"], "prompts": "p.jsonl"},
                                   headers=auth(ALICE)))
        assert "bounded" in errors["max_samples"]
        errors = bad_fields(submit(c, env, max_samples=101, job={"sampling": {"max_tokens": 65}}))
        assert set(errors) == {"max_samples", "job.sampling.max_tokens"}, errors
        assert submit(c, env, max_samples=100, max_tokens=64).status_code == 201


def test_a_job_too_big_for_the_free_space_fails_in_its_worker_naming_the_numbers_unless_forced(client, env, capsys):
    """Free space is checked when the job runs, not at submit (a queued job waits while the disk
    fills or empties): the worker refuses the job before it starts anything, and what it prints
    is the failed job's `error`. `ignore_free_space` reaches the worker's job."""
    from factory.default_model import DefaultModelConfig, prepare_default
    from factory.service.worker import main as worker
    from tiny_models import build_tiny_causal_lm

    tiny = build_tiny_causal_lm("llama", env["models"] / "tiny-llama",
                                tokenizer_dir=prepare_default(DefaultModelConfig(engine_check=False)))
    chat = [{"role": "user", "content": "Say one."}, {"role": "assistant", "content": "One."}]
    (env["data"] / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    settings, store = client.app.state.settings, client.app.state.store
    with small_filesystem(env["data"] / "small", "16k"):
        refused = submit(client, env, model=str(tiny), prompts="chat.jsonl", out="small/out").json()["id"]
        assert worker([str(write_spec(settings, store.get(refused)))]) == 1
        err = capsys.readouterr().err
        assert "error: the job's data set does not fit in" in err
        assert f"{env['data'] / 'small'} has {16 << 10:,} bytes (16.0 KiB) free" in err
        forced = submit(client, env, model=str(tiny), prompts="chat.jsonl", out="small/forced",
                        ignore_free_space=True).json()["id"]
        job, _ = load_spec(write_spec(settings, store.get(forced)))
        assert job.output.ignore_free_space


@pytest.mark.parametrize("job", [{"ray": {"address": "ray://evil:10001"}}, {"ray": {"num_cpus": 64}},
                                 {"servers": {"env": {"LD_PRELOAD": "/tmp/x.so"}}},
                                 {"servers": {"vllm_args": ["--trust-remote-code"]}},
                                 {"servers": {"urls": ["http://169.254.169.254"]}},
                                 {"capture": {"vllm_args": ["--trust-remote-code"]}},
                                 {"capture": {"vllm_env": {"LD_PRELOAD": "/tmp/x.so"}}}])
def test_service_owned_job_keys_are_refused(client, env, job):
    errors = bad_fields(submit(client, env, job=job))
    assert any("set by the service" in m for m in errors.values()), errors


def test_a_body_over_the_limit_is_413(env):
    with TestClient(create_app(make_settings(env, max_request_bytes=4096))) as c:
        r = c.post("/v1/jobs", json=spec(env, prompts=["p.jsonl"] * 1000), headers=auth(ALICE))
        assert r.status_code == 413
        assert submit(c, env).status_code == 201


# --------------------------------------------------------------------------- idempotency, cancel, durability


def test_a_retried_submit_with_the_same_idempotency_key_returns_the_same_job(client, env):
    key = {"Idempotency-Key": "retry-1", **auth(ALICE)}
    first = client.post("/v1/jobs", json=spec(env), headers=key)
    again = client.post("/v1/jobs", json=spec(env), headers=key)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]) == 1
    assert client.post("/v1/jobs", json=spec(env, max_samples=5), headers=key).status_code == 409
    # Keys are per user: Bob's "retry-1" is his own job.
    other = client.post("/v1/jobs", json=spec(env, out="out/bob"), headers={"Idempotency-Key": "retry-1",
                                                                         **auth(BOB)})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_two_active_jobs_cannot_write_one_output_directory(client, env):
    assert submit(client, env, out="sets/x").status_code == 201
    r = submit(client, env, out="sets/x", max_samples=3)
    assert r.status_code == 409 and "is used by job" in r.json()["detail"]
    assert submit(client, env, BOB, out="sets/x").status_code == 409  # nor another user's, ever


def test_cancelling_a_queued_job_cancels_it_at_once(client, env):
    job = submit(client, env).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE)).json()["state"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}/manifest", headers=auth(ALICE)).status_code == 404
    page = client.get(f"/v1/jobs/{job['id']}/quarantine", headers=auth(ALICE)).json()
    assert page == {"total": 0, "offset": 0, "limit": 100, "items": []}


def test_jobs_survive_a_restart_of_the_service(env):
    settings = make_settings(env)
    with TestClient(create_app(settings)) as c:
        job = submit(c, env).json()
    assert (env["data"] / ".specmill" / "jobs.db").is_file()
    with TestClient(create_app(make_settings(env))) as c:
        again = c.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE)).json()
    assert again["state"] == "queued" and again["id"] == job["id"] and again["out"] == job["out"]


def test_a_second_service_on_the_same_data_root_is_refused(env):
    with TestClient(create_app(make_settings(env))):
        with pytest.raises(SettingsError, match="another specmill service runs"):
            with TestClient(create_app(make_settings(env))):
                pass
    with TestClient(create_app(make_settings(env))) as c:  # free again once the first stopped
        assert c.get("/healthz").status_code == 200


def test_health_and_metrics_report_jobs_by_state(client, env):
    submit(client, env)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["db"] == "ok" and health["jobs"]["queued"] == 1
    metrics = client.get("/metrics").text
    assert 'specmill_jobs{state="queued"} 1.0' in metrics
    assert 'specmill_http_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in metrics
    assert "specmill_jobs_submitted_total 1.0" in metrics


def test_the_openapi_schema_lists_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/manifest",
            "/v1/jobs/{job_id}/quarantine", "/healthz", "/metrics"} <= set(paths)
