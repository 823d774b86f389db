"""`specmill serve` (the job service) and `specmill submit` (its client)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register_service(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the REST job service (jobs run on Ray; state in SQLite or PostgreSQL)",
        description="Serve POST/GET /v1/jobs, cancel, manifest, quarantine, /healthz and /metrics. Jobs are "
                    "queued in the database and handed to Ray as Ray jobs, at most --max-concurrent-jobs at once. "
                    "API tokens: SPECMILL_API_TOKENS=name=token,... or [[tokens]] in --config.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-root", type=Path, default=None,
                   help="outputs go here; database and job files in DATA_ROOT/.specmill (required here or in --config)")
    p.add_argument("--config", type=Path, default=None, help="service settings (TOML; see factory/service/settings.py)")
    p.add_argument("--db", default=None, help="postgresql://... for several replicas (default: SQLite in the data root)")
    p.add_argument("--input-root", type=Path, action="append", default=None, dest="input_roots",
                   help="another directory jobs may read models and prompts from (repeatable)")
    p.add_argument("--max-concurrent-jobs", type=int, default=None, help="jobs running at once (default 1; 0 pauses)")
    p.add_argument("--ray-address", default=None,
                   help="a Ray cluster's dashboard URL, http://head:8265 (default: a local cluster the service starts)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local cluster (default: the machine's)")
    p.add_argument("--ray-unavailable-timeout", type=float, default=None, dest="ray_unavailable_timeout_s",
                   help="seconds jobs wait for an unreachable Ray before they fail with the cause (default 180)")
    p.add_argument("--max-request-bytes", type=int, default=None, help="request body limit (default 1 MiB)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "submit", help="submit a factory job to the job service; print its id (--wait: follow it to the end)",
        description="Send a job (the same file and flags as `specmill factory run`) to a running `specmill serve`. "
                    "Relative paths are made absolute here. With --wait, print progress until the job ends; the "
                    "exit status is 0 only if it succeeded.",
    )
    p.add_argument("job", type=Path, nargs="?", default=None, help="job file (TOML); see factory/job.py")
    p.add_argument("--url", required=True, help="the service's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="API token (default: $SPECMILL_API_TOKEN)")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--idempotency-key", default=None, help="retrying with the same key returns the same job")
    p.add_argument("--model", type=Path, default=None, help="target model directory")
    p.add_argument("--prompts", type=Path, nargs="+", default=None, help="JSONL / Parquet files or directories")
    p.add_argument("--out", type=Path, default=None, help="output data set directory (inside the service's data root)")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N input rows")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens per answer")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, help="the temperature mix")
    p.add_argument("--keep-original-answers", action="store_true", default=None,
                   help="keep the data set's answers (no resampling, no vLLM)")
    p.add_argument("--ignore-free-space", action="store_true", default=None,
                   help="run the job even when its disk plan exceeds the free space where it goes")
    p.add_argument("--capture-backend", choices=("auto", "vllm", "transformers"), default=None,
                   help="what runs the target for hidden states (default auto: vllm for text targets)")
    p.set_defaults(func=_cmd_submit)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from factory.service.app import create_app
    from factory.service.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, data_root=args.data_root, db=args.db,
                                 input_roots=tuple(args.input_roots) if args.input_roots else None,
                                 max_concurrent_jobs=args.max_concurrent_jobs, ray_address=args.ray_address,
                                 ray_num_cpus=args.ray_num_cpus, max_request_bytes=args.max_request_bytes,
                                 ray_unavailable_timeout_s=args.ray_unavailable_timeout_s)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # uvicorn's access log has method, path and status only: never headers, so never a token.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from factory.client import ServiceError, run_submit

    flags = {name: getattr(args, name) for name in ("model", "prompts", "out", "max_samples", "max_tokens",
                                                     "temperatures", "keep_original_answers",
                                                     "ignore_free_space", "capture_backend")}
    try:
        return run_submit(args.url, args.token, args.job, flags, wait=args.wait,
                          idempotency_key=args.idempotency_key, echo=lambda line: print(line, flush=True))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
