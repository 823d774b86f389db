"""The factory's `specmill bench` subcommands, in help order; shared/cli.py adds them."""

from __future__ import annotations

from shared.cli import BenchCommand

COMMANDS = (
    BenchCommand(
        "capture", "factory.bench.capture",
        help="hidden-state capture tokens/s vs a plain forward pass of the same model (goal >= 0.9)",
        description="Capture tokens/s of the transformers backend against a plain forward pass of the same "
                    "model on the same batches and against one sequence per forward, and of the vLLM backend "
                    "against plain prefill on a server without capture, all in one run on made-up conversations."),
    BenchCommand(
        "service", "factory.bench.service",
        help="job service latency: concurrent submits + status polling, p50/p99, vs /healthz in the same run",
        description="Start the job service (uvicorn on loopback, real SQLite) with dispatch paused, submit N jobs "
                    "concurrently while polling their status, and report p50/p99 latency and errors next to "
                    "/healthz (no database) measured at the same concurrency in the same run."),
    BenchCommand(
        "factory", "factory.bench.factory",
        help="the resampler's generated tokens/s vs a plain load generator on the same vLLM server (goal >= 0.95), "
             "and each stage's throughput",
        description="Drive one vLLM server with the factory's resampler and with a plain saturating load generator "
                    "(same prompts, sampling settings and max tokens) in one run and compare generated tokens/s; "
                    "then time each stage of a factory job alone (read, resample, render, capture, write) and run an "
                    "end-to-end job on a local Ray against the same server."),
)
