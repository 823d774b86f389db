"""The REST job service: FastAPI routes over the job store; the dispatcher hands jobs to Ray.

Routes are thin: they authenticate, check who may see a job, validate the spec
(`specs.resolve_spec`) and read or write the store. No route runs a job: the dispatcher
thread submits claimed jobs to Ray (`ray_runner`), whose drivers do the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from factory.ray_auth import token_in_process
from factory.service.dispatcher import Dispatcher
from factory.service.ray_runner import LocalRayCluster, RayJobs
from factory.service.schemas import ErrorDetail, Health, JobCreate, JobList, JobPublic, JobState, QuarantinePage
from factory.service.settings import ApiToken, ServiceSettings, SettingsError
from factory.service.specs import SpecError, resolve_spec
from factory.service.store import JobRow, JobStore, OutDirInUse, new_job_id

log = logging.getLogger("specmill.service")

_bearer = HTTPBearer(auto_error=False, description="an API token (SPECMILL_API_TOKENS or the config's [[tokens]])")
_ERRORS = {401: {"model": ErrorDetail, "description": "no or unknown bearer token"},
           403: {"model": ErrorDetail, "description": "the token may not see this job"},
           404: {"model": ErrorDetail, "description": "no such job"}}


def create_app(settings: ServiceSettings, *, ray: RayJobs | None = None) -> FastAPI:
    """The app; its lifespan opens the store and runs the dispatcher. `ray` defaults to the
    cluster at settings.ray_address, or a local one under data_root."""
    if ray is None:
        local = None if settings.ray_address else LocalRayCluster(settings.state_dir / "ray", settings.ray_num_cpus)
        ray = RayJobs(address=settings.ray_address, local=local)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        lock = _single_service_lock(settings) if ray.local is not None else None
        auth = ExitStack()
        if ray.local is not None:  # the service's job-API client sends its own cluster's token
            auth.enter_context(token_in_process(ray.local.token_path()))
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the Ray start-up probe: not a line per try
        store = JobStore(settings.db_url)
        dispatcher = Dispatcher(settings, store, ray)
        app.state.store, app.state.dispatcher = store, dispatcher
        dispatcher.start()
        log.info("job service up: data root %s, %d token(s), at most %d job(s) at once", settings.data_root,
                 len(settings.tokens), settings.max_concurrent_jobs)
        yield
        dispatcher.stop()
        # Running jobs keep the cluster: they finish there, and the next start finds them.
        if ray.local is not None and not store.active():
            ray.local.stop()
        store.close()
        auth.close()
        if lock is not None:
            lock.close()

    app = FastAPI(title="specmill job service", version="1", lifespan=lifespan,
                  description="Submit, watch and cancel specmill factory jobs; they run on Ray.")
    app.state.settings = settings
    app.state.metrics = _Metrics(app)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    _routes(app, settings)
    return app


def _single_service_lock(settings: ServiceSettings) -> Any:
    """One service per data root when it runs its own Ray cluster: a second one would follow the
    same jobs on the same cluster. The lock goes with the process, however it ends."""
    import fcntl

    handle = open(settings.state_dir / "service.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SettingsError(f"another specmill service runs on {settings.data_root}; stop it first "
                            f"(several replicas need PostgreSQL and a shared Ray cluster, --ray-address)") from None
    return handle


# --------------------------------------------------------------------------- dependencies


def _principal(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiToken:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.settings.principal(credentials.credentials)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return principal


def _store(request: Request) -> JobStore:
    return request.app.state.store


Principal = Annotated[ApiToken, Depends(_principal)]
Store = Annotated[JobStore, Depends(_store)]


def _visible_job(job_id: str, principal: Principal, store: Store) -> JobRow:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    if job.owner != principal.name and not principal.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"job {job_id} belongs to another user")
    return job


VisibleJob = Annotated[JobRow, Depends(_visible_job)]
PageLimit = Annotated[int, Query(ge=1, le=1000)]
PageOffset = Annotated[int, Query(ge=0, le=1 << 40)]


# --------------------------------------------------------------------------- routes


def _routes(app: FastAPI, settings: ServiceSettings) -> None:
    """Every route, in this order: jobs, a job's output, the service's own."""
    _job_routes(app, settings)
    _output_routes(app)
    _service_routes(app)


def _job_routes(app: FastAPI, settings: ServiceSettings) -> None:
    """Submit, list, read and cancel jobs."""

    @app.post("/v1/jobs", status_code=201, response_model=JobPublic, tags=["jobs"],
              responses={**_ERRORS, 200: {"model": JobPublic, "description": "a retried submit: the same job"},
                         400: {"model": ErrorDetail, "description": "the body is not JSON"},
                         409: {"model": ErrorDetail, "description": "the Idempotency-Key was used for another "
                                                                    "spec, or the output directory is in use"},
                         413: {"model": ErrorDetail, "description": "request body too large"}})
    def submit_job(spec: JobCreate, principal: Principal, store: Store, response: Response,
                   idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobPublic:
        body = spec.model_dump(exclude_none=True)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if idempotency_key is not None and (earlier := _replay(store, principal, idempotency_key, digest)):
            response.status_code = 200
            return earlier
        job_id = new_job_id()
        flat = {k: v for k, v in body.items() if k != "job"}
        try:
            resolved = resolve_spec(spec.job, flat, settings, job_id)
            job, created = store.create(owner=principal.name, idempotency_key=idempotency_key, request_sha256=digest,
                                        spec=resolved.tables, out_dir=str(resolved.out_dir), job_id=job_id)
        except SpecError as e:
            raise HTTPException(422, [err.to_json() for err in e.errors]) from None
        except OutDirInUse as e:
            raise HTTPException(409, str(e)) from None
        if not created:  # a concurrent retry with the same key won
            response.status_code = 200
            if job.request_sha256 != digest:
                raise HTTPException(409, "this Idempotency-Key was used for another job spec")
        else:
            app.state.metrics.submitted.inc()
            log.info("job %s queued for %s: %s -> %s", job.id, principal.name, job.spec.get("model"), job.out_dir)
        return JobPublic.from_row(job)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"], responses={401: _ERRORS[401]})
    def list_jobs(principal: Principal, store: Store, state: JobState | None = None,
                  limit: PageLimit = 100,
                  offset: PageOffset = 0) -> JobList:
        rows = store.list(owner=None if principal.admin else principal.name, state=state, limit=limit, offset=offset)
        return JobList(jobs=[JobPublic.from_row(r) for r in rows], offset=offset, limit=limit)

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=_ERRORS)
    def get_job(job: VisibleJob) -> JobPublic:
        return JobPublic.from_row(job)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"], responses=_ERRORS)
    def cancel_job(job: VisibleJob, store: Store) -> JobPublic:
        """Queued: cancelled at once. Running: Ray is asked to stop it (state becomes cancelled
        when it has stopped). Finished: unchanged."""
        if job.state in ("queued", "running"):
            job = store.request_cancel(job.id)
            log.info("job %s: cancel requested", job.id)
        return JobPublic.from_row(job)


def _output_routes(app: FastAPI) -> None:
    """What a job has written: its manifest and its quarantined rows."""

    @app.get("/v1/jobs/{job_id}/manifest", tags=["jobs"],
             responses={**_ERRORS, 200: {"description": "the data set's manifest.json (shared/manifest.py)",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    def get_manifest(job: VisibleJob) -> Response:
        path = Path(job.out_dir) / "manifest.json"
        try:
            return Response(path.read_bytes(), media_type="application/json")
        except FileNotFoundError:
            raise HTTPException(404, f"job {job.id} has no manifest yet (state {job.state})") from None

    @app.get("/v1/jobs/{job_id}/quarantine", response_model=QuarantinePage, tags=["jobs"], responses=_ERRORS)
    def get_quarantine(job: VisibleJob, offset: PageOffset = 0,
                       limit: PageLimit = 100
                       ) -> QuarantinePage:
        total, items = _quarantine_page(Path(job.out_dir), offset, limit)
        return QuarantinePage(total=total, offset=offset, limit=limit, items=items)


def _service_routes(app: FastAPI) -> None:
    """Health and Prometheus metrics."""

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz(request: Request) -> Health:
        store: JobStore = request.app.state.store
        try:
            counts, db = store.counts(), "ok"
        except Exception as e:  # noqa: BLE001 - health reports the failure instead of raising it
            counts, db = {}, f"error: {type(e).__name__}"
        ray_state = request.app.state.dispatcher.ray_state
        ok = db == "ok" and not ray_state.startswith("unavailable")
        return Health(status="ok" if ok else "degraded", db=db, ray=ray_state, jobs=counts)

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    def metrics(request: Request) -> Response:
        return request.app.state.metrics.render(request.app.state.store)


def _replay(store: JobStore, principal: ApiToken, key: str, digest: str) -> JobPublic | None:
    """The job an earlier submit with this key made, if any (the same spec, or 409)."""
    job = store.by_key(principal.name, key)
    if job is None:
        return None
    if job.request_sha256 != digest:
        raise HTTPException(409, "this Idempotency-Key was used for another job spec")
    return JobPublic.from_row(job)


def _quarantine_page(out_dir: Path, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Committed quarantine records (listed in the manifest), in commit order."""
    from shared.manifest import ManifestError, load_manifest

    try:
        summary = load_manifest(out_dir).info.get("quarantine", {"files": [], "rows": 0})
    except ManifestError:
        return 0, []
    items: list[dict[str, Any]] = []
    skip = offset
    for entry in summary["files"]:
        if skip >= entry["rows"]:
            skip -= entry["rows"]
            continue
        with open(out_dir / entry["file"]) as f:
            for line in f:
                if skip:
                    skip -= 1
                    continue
                items.append(json.loads(line))
                if len(items) == limit:
                    return summary["rows"], items
    return summary["rows"], items


# --------------------------------------------------------------------------- middleware


class _BodyLimit:
    """413 for a request body over `max_bytes`, by Content-Length or as it streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(self.max_bytes, scope, receive, send)
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if started:
                raise
            await _too_large(self.max_bytes, scope, receive, send)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, scope: dict[str, Any], receive: Any, send: Any) -> None:
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response(scope, receive, send)


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can share a process)."""

    def __init__(self, app: FastAPI):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("specmill_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("specmill_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.submitted = Counter("specmill_jobs_submitted", "jobs accepted", registry=self.registry)

        @app.middleware("http")
        async def measure(request: Request, call_next: Any) -> Response:
            started = time.perf_counter()
            response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", "unmatched")
            self.requests.labels(request.method, route, str(response.status_code)).inc()
            self.latency.labels(request.method, route).observe(time.perf_counter() - started)
            return response

    def render(self, store: JobStore) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

        jobs = CollectorRegistry()
        gauge = Gauge("specmill_jobs", "jobs by state", ["state"], registry=jobs)
        for state, n in store.counts().items():
            gauge.labels(state).set(n)
        return Response(generate_latest(self.registry) + generate_latest(jobs), media_type=CONTENT_TYPE_LATEST)
