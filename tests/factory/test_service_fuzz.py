"""Property-based fuzzing of the job service's published OpenAPI schema (schemathesis): no
request, valid or not, gets a 5xx, and every answer matches the schema's status codes,
content types and response schemas. Real app, real SQLite file; dispatch paused, so the
fuzzed jobs that pass validation stay queued."""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from factory.service.app import create_app
from factory.service.settings import ApiToken, ServiceSettings

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = int(os.environ.get("SPECMILL_FUZZ_EXAMPLES", "60"))  # per operation; raise it for a longer run


@pytest.fixture(scope="module")
def service_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    app = create_app(ServiceSettings(data_root=root, tokens=(ApiToken(name="fuzzer", token=TOKEN),),
                                     max_concurrent_jobs=0, max_request_bytes=64 << 10))
    with TestClient(app) as client:  # runs the lifespan (store open, one-service lock taken)
        # A real job, so the per-job routes answer more than 404 when an id happens to match.
        r = client.post("/v1/jobs", json={"model": "model", "prompts": "p.jsonl", "max_samples": 1},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
    # Closed again before schemathesis calls: its ASGI client runs the lifespan itself, and a
    # second lifespan while this one held the data root's lock would be refused as a second service.
    yield app


@pytest.fixture(scope="module")
def api_schema(service_app):
    return schemathesis.openapi.from_asgi("/openapi.json", service_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_to_the_job_service_gets_a_5xx_or_an_answer_outside_its_schema(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_without_a_token_nothing_but_health_and_metrics_answers_2xx(case):
    response = case.call()
    assert response.status_code < 500
    if case.path not in ("/healthz", "/metrics", "/openapi.json"):
        assert response.status_code in (400, 401, 404, 405, 413, 422), (case.path, response.status_code)
