"""`specmill bench service`: the job service's request latency under concurrent submits and polling.

It starts `specmill serve` as a subprocess (uvicorn on loopback, a real SQLite file in a
fresh data root) with dispatch paused (`--max-concurrent-jobs 0`), so the figures are the
service's own (validation, database, JSON), not a job's CPU load. In one run it measures:

  baseline  N concurrent GET /healthz (no auth, no database read beyond a count)
  submit    N concurrent POST /v1/jobs (each a distinct, valid job spec)
  poll      each of the N clients then GETs its job `--polls` times

and prints p50/p99 per kind, the ratios to the baseline (this machine is shared and noisy:
compare ratios, not milliseconds) and the error count, which must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from shared.vllm_launch import free_port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=50, help="concurrent clients, one submit each")
    p.add_argument("--polls", type=int, default=10, help="status polls per client after its submit")
    p.add_argument("--dir", type=Path, default=None, help="data root (default: a new temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")


def run_cli(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.polls < 0:
        raise ValueError("--jobs must be >= 1 and --polls >= 0")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    root = args.dir or Path(tempfile.mkdtemp(prefix="specmill-bench-service-"))
    figures = bench_service(root, jobs=args.jobs, polls=args.polls)
    print(format_figures(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if figures["errors"] == 0 else 1


def bench_service(root: Path, *, jobs: int, polls: int) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    # Validation needs a model directory (config.json) and an input file; no job runs.
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    token = secrets.token_urlsafe(24)
    port = free_port()
    env = {**os.environ, "SPECMILL_API_TOKENS": f"bench={token}"}
    with open(root / "serve.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), "--data-root", str(root), "--max-concurrent-jobs", "0", "--log-level",
                                 "warning"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, proc)
        return asyncio.run(_measure(url, token, jobs, polls))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"specmill serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"specmill serve did not answer at {url} within {timeout_s:.0f} s")


async def _measure(url: str, token: str, jobs: int, polls: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    latencies: dict[str, list[float]] = {"baseline_healthz": [], "submit": [], "poll": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=jobs, max_keepalive_connections=jobs)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60.0) as client:
        async def timed(kind: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
            started = time.perf_counter()
            try:
                response = await client.request(method, path, **kw)
            except httpx.HTTPError as e:
                errors.append(f"{kind}: {type(e).__name__}: {e}")
                return None
            latencies[kind].append(time.perf_counter() - started)
            if response.status_code >= 300:
                errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
            return response

        # Warm-up (connections opened, server threads started), then the baseline on warm connections.
        await asyncio.gather(*(client.get("/healthz") for _ in range(jobs)))
        await asyncio.gather(*(timed("baseline_healthz", "GET", "/healthz") for _ in range(jobs)))

        async def client_run(i: int) -> None:
            spec = {"model": "model", "prompts": "prompts.jsonl", "max_samples": 1 + i, "max_tokens": 16,
                    "out": f"out/bench-{i}"}
            response = await timed("submit", "POST", "/v1/jobs", json=spec)
            if response is None or response.status_code != 201:
                return
            job_id = response.json()["id"]
            for _ in range(polls):
                await timed("poll", "GET", f"/v1/jobs/{job_id}")

        started = time.perf_counter()
        await asyncio.gather(*(client_run(i) for i in range(jobs)))
        wall = time.perf_counter() - started
    figures: dict[str, Any] = {"jobs": jobs, "polls_per_job": polls, "errors": len(errors),
                               "error_samples": errors[:5], "submit_phase_s": round(wall, 3),
                               "requests_per_s": round((len(latencies["submit"]) + len(latencies["poll"])) / wall, 1)}
    for kind, values in latencies.items():
        figures[kind] = _percentiles(values)
    base = figures["baseline_healthz"]
    for kind in ("submit", "poll"):
        for p in ("p50_ms", "p99_ms"):
            if base[p] and figures[kind][p]:
                figures[kind][f"{p[:3]}_vs_healthz"] = round(figures[kind][p] / base[p], 2)
    return figures


def _percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    ms = sorted(v * 1000 for v in values)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(ms[-1], 2)}


def format_figures(f: dict[str, Any]) -> str:
    lines = [f"job service: {f['jobs']} concurrent clients, 1 submit + {f['polls_per_job']} polls each "
             f"(dispatch paused; SQLite WAL)", f"  {'kind':<18} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50/base':>9} "
             f"{'p99/base':>9}"]
    for kind in ("baseline_healthz", "submit", "poll"):
        d = f[kind]
        lines.append(f"  {kind:<18} {d['n']:>5} {_num(d['p50_ms']):>9} {_num(d['p99_ms']):>9} "
                     f"{_num(d.get('p50_vs_healthz')):>9} {_num(d.get('p99_vs_healthz')):>9}")
    lines.append(f"  {f['requests_per_s']} requests/s over the submit+poll phase ({f['submit_phase_s']} s); "
                 f"errors: {f['errors']}")
    lines += [f"  error: {e}" for e in f["error_samples"]]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
