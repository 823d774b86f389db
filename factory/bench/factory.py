"""`specmill bench factory`: the resampler against a plain load generator on the same vLLM
server, and the throughput of each stage of a factory job.

Everything runs in one process against one vLLM server (started here, with the job's own
default engine flags, or given with `--server-url`), on the same single-turn prompts made
up locally (no download).

Resampler vs plain load generator (`passes` rounds, the order rotating from round to round
so that a change of load on a shared machine hits every mode alike; first one untimed
warm-up round on other prompts, then the timed prompts, short, at the widest concurrency:
prefix cache filled and every batch size seen once):
- resampler: `factory.resample.ResampleStage` on all prompts at once, as the pipeline runs
  it (its own server pool and `servers.concurrency` slots, `return_token_ids`, retries),
  outcomes out: rendered rows with loss masks;
- plain: `concurrency` asyncio workers on one httpx client pulling the same requests (same
  prompt token ids, max_tokens, temperature drawn from the sample id, top_p and seed) from
  one queue and counting `usage.completion_tokens`, nothing else: the ceiling a client can
  reach at that concurrency;
- plain at twice the concurrency: whether the server was saturated at all (a ratio near 1
  says more requests in flight would not have helped).
Generated tokens/s are compared; goal: resampler >= 0.95 x plain.

Stages, each alone on the same samples (the server idle meanwhile): read (input rows ->
normalised prompts with sample ids), resample (the resampler's timed passes above), render
(the data set's own answers -> token ids and loss masks, the keep-original path), capture
(transformers `CaptureStage` on the resampled rows), write (`ShardWriter`, fsync'd commit).
Then the end-to-end job: `run_job` on a local Ray against the same server, with the rates
its progress report gives per stage. In a pipelined job every stage moves at the pace of
the slowest one, which the stage-alone figures name.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.bench.conversations import QUESTIONS, SYSTEM, TOPICS, made_up_answer

log = logging.getLogger("specmill.factory.bench_factory")

GOAL = 0.95
MODES = ("resampler", "plain", "plain_2x")
STAGES = ("read", "resample", "render", "capture", "write")


def bench_chats(n: int, *, seed: int = 0, skip: int = 0) -> list[list[dict[str, str]]]:
    """`n` distinct single-turn chats in OpenAI messages form, each with a made-up answer (for
    the render stage; resampling replaces it), reproducible from `seed`; `skip` leaves out the
    first ones (warm-up prompts that never repeat a timed one)."""
    # Every (system?, topic, question) combination is a distinct prompt, so no two samples share an
    # id (the pipeline would quarantine the second as a duplicate).
    combos = list(itertools.product((False, True), TOPICS, QUESTIONS))
    if skip + n > len(combos):
        raise ValueError(f"samples + warmup must be at most {len(combos)} (distinct prompts), got {skip + n}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    chats = []
    for system, topic, question in combos[skip:skip + n]:
        messages = [{"role": "system", "content": SYSTEM}] if system else []
        answer = made_up_answer(rng, topic, round(2 ** rng.uniform(1.0, 4.0)))
        messages += [{"role": "user", "content": question.format(t=topic)}, {"role": "assistant", "content": answer}]
        chats.append(messages)
    return chats


# --------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class BenchFactoryConfig:
    model: Path | None = None  # None: the default model (prepared from PyPI into the cache if missing)
    server_url: str | None = None  # None: start a vLLM server with the job's default engine flags
    samples: int = 64  # prompts timed per mode and pass
    warmup: int = 8  # other prompts, every mode once, untimed
    max_tokens: int = 64
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)  # the job default's mix
    top_p: float = 1.0
    concurrency: int = 32  # requests in flight (servers.concurrency, the job default)
    passes: int = 6  # a multiple of the 3 modes, so that each goes first as often as the others
    max_length: int = 1024  # render cap and the started server's --max-model-len
    seed: int = 0
    stages: bool = True  # time each stage alone
    end_to_end: bool = True  # run a factory job on local Ray against the same server
    goal: float = GOAL

    def __post_init__(self) -> None:
        if self.model is not None:
            self.model = Path(self.model).expanduser()
        if self.server_url is not None:
            self.server_url = self.server_url.rstrip("/")
            if not self.server_url.startswith(("http://", "https://")):
                raise ValueError(f"server_url must be an http(s) base URL like http://host:8000, got {self.server_url!r}")
        self.temperatures = tuple(float(t) for t in self.temperatures)
        for name in ("samples", "warmup", "max_tokens", "concurrency", "passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length <= self.max_tokens:
            raise ValueError(f"max_length ({self.max_length}) must exceed max_tokens ({self.max_tokens}): "
                             f"the prompt needs room too")
        if not self.temperatures or min(self.temperatures) < 0:
            raise ValueError(f"temperatures must be a non-empty list of numbers >= 0, got {self.temperatures}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        bench_chats(self.samples, skip=self.warmup)  # enough distinct prompts?


# --------------------------------------------------------------------------- figures


def summarize(config: BenchFactoryConfig, *, model: str, data: dict[str, Any], timed: dict[str, dict[str, float]],
              stages: dict[str, dict[str, float]], end_to_end: dict[str, Any] | None,
              machine: dict[str, Any]) -> dict[str, Any]:
    """The figures: `timed[mode] = {tokens, seconds, requests}` summed over the passes, and
    `pass_tokens_per_s` (one rate per pass); `stages[name] = {samples, tokens, seconds}`."""
    results = [{"mode": mode, "requests": int(t["requests"]), "generated_tokens": int(t["tokens"]),
                "seconds": t["seconds"], "tokens_per_s": t["tokens"] / t["seconds"],
                "pass_tokens_per_s": list(t["pass_tokens_per_s"]),
                "concurrency": config.concurrency * (2 if mode == "plain_2x" else 1), "passes": config.passes}
               for mode, t in timed.items()]
    rate = {r["mode"]: r["tokens_per_s"] for r in results}
    value = rate["resampler"] / rate["plain"]
    # Within a pass the modes run back to back, so a pass's ratio is spared the slow drifts of a
    # shared machine's load; their spread says how far to trust the overall one.
    per_pass = [a / b for a, b in zip(timed["resampler"]["pass_tokens_per_s"], timed["plain"]["pass_tokens_per_s"])]
    ratios: dict[str, Any] = {"resampler_vs_plain": value, "resampler_vs_plain_per_pass": per_pass}
    if "plain_2x" in rate:
        ratios["plain_2x_vs_plain"] = rate["plain_2x"] / rate["plain"]
    stage_rows = {name: {**s, "samples_per_s": s["samples"] / s["seconds"], "tokens_per_s": s["tokens"] / s["seconds"]}
                  for name, s in stages.items()}
    if stage_rows:
        ratios["slowest_stage"] = min(stage_rows, key=lambda n: stage_rows[n]["samples_per_s"])
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "model": model,
        "data": data,
        "machine": machine,
        "results": results,
        "ratios": ratios,
        "verdict": {"resampler_vs_plain": {"value": value, "goal": config.goal, "pass": value >= config.goal}},
        "stages": stage_rows,
        "end_to_end": end_to_end,
    }


_LABELS = {"resampler": "resampler (ResampleStage, token ids)", "plain": "plain load generator",
           "plain_2x": "plain load generator, 2x concurrency"}
_STAGE_LABELS = {"read": "read (rows -> prompts, ids)", "resample": "resample (vLLM, generated tokens)",
                 "render": "render (own answers, loss masks)", "capture": "capture (transformers)",
                 "write": "write (shards, fsync'd commit)"}


def format_report(figures: dict[str, Any]) -> str:
    cfg, data = figures["config"], figures["data"]
    plain = next(r["tokens_per_s"] for r in figures["results"] if r["mode"] == "plain")
    header = f"{'client':<40} {'conc.':>5} {'tokens':>8} {'tokens/s':>9} {'x plain':>8}  {'goal':>7}  result"
    lines = [f"{Path(figures['model']).name} on {figures['server']}: {data['samples']} single-turn prompts "
             f"({data['prompt_tokens']} prompt tokens), max_tokens {cfg['max_tokens']}, temperatures "
             f"{list(cfg['temperatures'])}, {cfg['passes']} timed pass(es) per mode", "", header, "-" * len(header)]
    verdict = figures["verdict"]["resampler_vs_plain"]
    per_pass = figures["ratios"]["resampler_vs_plain_per_pass"]
    for r in figures["results"]:
        goal = status = ""
        if r["mode"] == "resampler":
            goal, status = f">= {verdict['goal']:.2f}", "PASS" if verdict["pass"] else "FAIL"
        lines.append(f"{_LABELS[r['mode']]:<40} {r['concurrency']:>5} {r['generated_tokens']:>8} "
                     f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / plain:>8.2f}  {goal:>7}  {status}")
    if per_pass:
        lines.append(f"resampler / plain pass by pass: {', '.join(f'{v:.2f}' for v in per_pass)} (median "
                     f"{statistics.median(per_pass):.2f})")
    if figures["stages"]:
        header = f"{'stage, alone':<40} {'samples':>7} {'samples/s':>10} {'tokens/s':>10}"
        lines += ["", header, "-" * len(header)]
        for name, s in figures["stages"].items():
            lines.append(f"{_STAGE_LABELS[name]:<40} {s['samples']:>7} {s['samples_per_s']:>10.2f} "
                         f"{s['tokens_per_s']:>10.0f}")
        lines.append(f"slowest stage: {figures['ratios']['slowest_stage']}")
    e2e = figures["end_to_end"]
    if e2e:
        st = e2e["stages"]
        lines += ["", f"end-to-end job ({e2e['samples']} samples, {e2e['quarantined']} quarantined): "
                      f"{e2e['samples_per_s']:.2f} samples/s, {e2e['tokens_per_s']:.0f} tokens/s written over "
                      f"{e2e['elapsed_s']:.1f} s (+ start-up {e2e['startup_s']:.1f} s: Ray, capture model)",
                  f"  per stage over the run: read {st['read']['per_s']:.2f}/s, resample "
                  f"{st['resample']['tokens_per_s']:.0f} generated tok/s, capture {st['capture']['tokens_per_s']:.0f} "
                  f"tok/s, write {st['write']['per_s']:.2f} samples/s"]
    m = figures["machine"]
    start, end = m["load_avg_start"], m["load_avg_end"]
    lines.append(f"machine: {m['cpus']} CPUs, load average {start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f} at the "
                 f"start, {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} at the end (other work on the machine slows "
                 f"every figure; the ratios are measured in the same run)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurement


@dataclass(kw_only=True, slots=True)
class _Request:
    """One request as both clients send it."""

    prompt: Any  # factory.resample.Prompt
    prompt_ids: list[int]
    temperature: float
    seed: int


def run_bench(config: BenchFactoryConfig) -> dict[str, Any]:
    from factory.job import SamplingConfig
    from factory.targets import Frontend, TargetConfig

    load_start = os.getloadavg()
    model = config.model or _default_model()
    frontend = Frontend.load(TargetConfig(model=model))
    sampling = SamplingConfig(max_tokens=config.max_tokens, temperatures=config.temperatures, top_p=config.top_p,
                              seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="specmill-bench-factory-") as scratch:
        scratch = Path(scratch)
        prompts_file = _write_prompts(scratch / "prompts.jsonl", bench_chats(config.samples, seed=config.seed,
                                                                             skip=config.warmup))
        warm_file = _write_prompts(scratch / "warm.jsonl", bench_chats(config.warmup, seed=config.seed))
        with _server(config, model, scratch) as (url, model_name):
            requests, read_stage = _read(prompts_file, frontend, sampling)
            warm, _ = _read(warm_file, frontend, sampling)
            timed, outcomes = asyncio.run(_compare(config, frontend, sampling, url, model_name, requests, warm))
            stages: dict[str, dict[str, float]] = {}
            if config.stages:
                stages = {"read": read_stage, "resample": _resample_stage(timed["resampler"]),
                          "render": _render_stage(frontend, config, requests),
                          **_capture_and_write(model, config, outcomes, scratch)}
            e2e = _end_to_end(config, model, url, model_name, prompts_file, scratch) if config.end_to_end else None
    data = {"samples": len(requests), "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "warmup": len(warm)}
    figures = summarize(config, model=str(model), data=data, timed=timed, stages=stages, end_to_end=e2e,
                        machine={"cpus": os.cpu_count(), "load_avg_start": list(load_start),
                                 "load_avg_end": list(os.getloadavg())})
    figures["server"] = config.server_url or "a vLLM server started here (job defaults)"
    return figures


class _server:
    """`with _server(...) as (url, model_name)`: the given server, or one started with the
    factory job's default engine flags (what `specmill factory run` would start)."""

    def __init__(self, config: BenchFactoryConfig, model: Path, scratch: Path):
        self.config, self.model, self.scratch = config, model, scratch
        self.server = None

    def __enter__(self) -> tuple[str, str | None]:
        if self.config.server_url is not None:
            return self.config.server_url, None
        from factory.job import ServersConfig
        from factory.render import RenderConfig
        from factory.resample import server_config
        from factory.vllm_server import VllmServer

        logs = Path(tempfile.gettempdir())  # kept after the scratch dir goes, for a failed start
        self.server = VllmServer(server_config(self.model, ServersConfig(), RenderConfig(max_length=self.config.max_length),
                                               logs))
        started = time.perf_counter()
        self.server.start()
        log.info("vLLM server up after %.0f s (log %s)", time.perf_counter() - started, self.server.log_path)
        return self.server.base_url, self.server.model_name

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()


def _write_prompts(path: Path, chats: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return path


def _read(path: Path, frontend: Any, sampling: Any) -> tuple[list[_Request], dict[str, float]]:
    """The read stage as the pipeline does it (rows -> normalised messages -> sample ids), timed;
    then each prompt's first request, as both clients send it."""
    from factory.answers import AnswerRenderer, TokenChat
    from factory.inputs import resample_turns
    from factory.render import RenderConfig

    start = time.perf_counter()
    prompts = _read_prompts(path, sampling)
    seconds = time.perf_counter() - start
    answers = AnswerRenderer(frontend, RenderConfig())
    requests = [_Request(prompt=p, prompt_ids=answers.prompt(TokenChat(), resample_turns(p.messages)[0]),
                         temperature=sampling.temperature_for(p.sample_id), seed=sampling.request_seed(p.sample_id, 0))
                for p in prompts]
    tokens = sum(len(r.prompt_ids) for r in requests)
    return requests, {"samples": len(prompts), "tokens": tokens, "seconds": seconds}


def _read_prompts(path: Path, sampling: Any) -> list[Any]:
    """What the pipeline's driver does per input row (`_Driver._prompts`), less the resume
    bookkeeping: read, normalise, give the sample its id."""
    from factory.inputs import normalize, read_rows
    from factory.job import InputConfig
    from factory.render import conversation_id
    from factory.resample import Prompt

    config, settings = InputConfig(paths=(path,)), sampling.generation_settings()
    prompts = []
    for src in read_rows(config):
        if src.error is not None:
            raise ValueError(f"{src.file}:{src.row}: {src.error}")
        messages = normalize(src.data, config)
        prompts.append(Prompt(sample_id=conversation_id(messages, **settings), source_index=src.index,
                              file=src.file, row=src.row, messages=messages))
    return prompts


async def _compare(config: BenchFactoryConfig, frontend: Any, sampling: Any, url: str, model_name: str | None,
                   requests: list[_Request], warm: list[_Request]) -> tuple[dict[str, dict[str, float]], list[Any]]:
    """Each mode once on the warm-up prompts, then `passes` timed rounds in rotating order."""
    import httpx

    from factory.job import ServersConfig
    from factory.render import RenderConfig
    from factory.resample import ResampleStage, served_model_name

    servers = ServersConfig(urls=(url,), concurrency=config.concurrency)
    stage = ResampleStage(frontend=frontend, render=RenderConfig(max_length=config.max_length), sampling=sampling,
                          servers=servers, urls=[url], model_name=model_name)
    timed: dict[str, dict[str, Any]] = {mode: {"tokens": 0, "seconds": 0.0, "requests": 0, "pass_tokens_per_s": []}
                                        for mode in MODES}
    outcomes: list[Any] = []
    slots = 2 * config.concurrency
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots)) as client:
        name = model_name or await served_model_name(client, [url])

        async def run(mode: str, batch: list[_Request]) -> int:
            nonlocal outcomes
            if mode == "resampler":
                outcomes = await stage([r.prompt for r in batch])
                failed = [o for o in outcomes if o.row is None]
                if failed:
                    raise RuntimeError(f"{len(failed)} prompts were not resampled, e.g. {failed[0].reason}")
                return sum(o.generated_tokens for o in outcomes)
            width = config.concurrency * (2 if mode == "plain_2x" else 1)
            return await plain_load(client, name, batch, max_tokens=config.max_tokens, top_p=config.top_p,
                                    concurrency=width)

        try:
            for mode in MODES:
                await run(mode, warm)
            # The timed prompts into the server's prefix cache, and the server through every batch
            # size the timed rounds reach (on CPU a batch of a new size is slow the first time), so
            # that the mode going first in the first round pays for nothing the others are spared.
            await plain_load(client, name, requests, max_tokens=min(16, config.max_tokens), top_p=config.top_p,
                             concurrency=2 * config.concurrency)
            for k in range(config.passes):
                for mode in MODES[k % 3:] + MODES[:k % 3]:  # rotate which goes first
                    start = time.perf_counter()
                    tokens = await run(mode, requests)
                    seconds = time.perf_counter() - start
                    timed[mode]["seconds"] += seconds
                    timed[mode]["pass_tokens_per_s"].append(tokens / seconds)
                    timed[mode]["tokens"] += tokens
                    timed[mode]["requests"] += len(requests)
                log.info("pass %d/%d timed: %s", k + 1, config.passes,
                         {m: round(t["tokens"] / t["seconds"], 1) for m, t in timed.items()})
        finally:
            await stage.aclose()
    return timed, outcomes


async def plain_load(client: Any, model: str, requests: Sequence[_Request], *, max_tokens: int, top_p: float,
                     concurrency: int) -> int:
    """`concurrency` workers take the next request from one queue until none is left; the
    generated tokens the server reports, summed."""
    queue = iter(requests)  # shared: asyncio runs one worker at a time between awaits
    total = 0

    async def worker() -> None:
        nonlocal total
        for r in queue:
            body = {"model": model, "prompt": r.prompt_ids, "max_tokens": max_tokens, "temperature": r.temperature,
                    "top_p": top_p, "seed": r.seed}
            response = await client.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"the vLLM server answered {response.status_code}: {response.text[:300]}")
            total += response.json()["usage"]["completion_tokens"]

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return total


def _resample_stage(timed: dict[str, float]) -> dict[str, float]:
    """The resampler's timed passes: every prompt, all its turns, rendered to rows."""
    return {"samples": int(timed["requests"]), "tokens": int(timed["tokens"]), "seconds": timed["seconds"]}


def _render_stage(frontend: Any, config: BenchFactoryConfig, requests: list[_Request]) -> dict[str, float]:
    """The keep-original path: each chat with its own answer -> token ids and loss mask (two
    renders per assistant turn)."""
    from factory.job import SamplingConfig, ServersConfig
    from factory.render import RenderConfig
    from factory.resample import ResampleStage

    stage = ResampleStage(frontend=frontend, render=RenderConfig(max_length=config.max_length),
                          sampling=SamplingConfig(keep_original_answers=True), servers=ServersConfig())
    start = time.perf_counter()
    outcomes = [stage.original(r.prompt) for r in requests]
    seconds = time.perf_counter() - start
    rows = [o.row for o in outcomes if o.row is not None]
    if len(rows) != len(requests):
        raise RuntimeError(f"{len(requests) - len(rows)} bench chats did not render")
    return {"samples": len(rows), "tokens": sum(r.num_tokens for r in rows), "seconds": seconds}


def _capture_and_write(model: Path, config: BenchFactoryConfig, outcomes: list[Any], scratch: Path
                       ) -> dict[str, dict[str, float]]:
    """Capture the resampled rows (transformers, the job's default settings, the model loaded
    first and untimed), then write them as a shard data set."""
    from factory.capture import CaptureStage, length_buckets
    from factory.job import CaptureSettings
    from shared.shards import ShardWriter

    settings = CaptureSettings()
    stage = CaptureStage(settings.target_config(model), settings.capture_config())
    rows = [o.row for o in outcomes]
    stage(rows[:1])  # warm-up
    start = time.perf_counter()
    samples = []
    for bucket in length_buckets([r.num_tokens for r in rows], max_batch_tokens=settings.max_batch_tokens,
                                 max_batch_size=settings.max_batch_size):
        samples += stage([rows[i] for i in bucket])
    capture_s = time.perf_counter() - start
    tokens = sum(r.num_tokens for r in rows)
    start = time.perf_counter()
    writer = ShardWriter(scratch / "shards", stage.header)
    for sample in samples:
        writer.add(sample)
    writer.close(complete=True)
    write_s = time.perf_counter() - start
    written = sum(s.aux_hidden_states.nbytes + s.last_hidden_state.nbytes for s in samples)
    return {"capture": {"samples": len(rows), "tokens": tokens, "seconds": capture_s},
            "write": {"samples": len(samples), "tokens": tokens, "seconds": write_s, "hidden_state_bytes": written}}


def _end_to_end(config: BenchFactoryConfig, model: Path, url: str, model_name: str | None, prompts: Path,
                scratch: Path) -> dict[str, Any]:
    """A factory job on a local Ray against the same server, as `specmill factory run` runs it."""
    from factory.inputs import MediaPaths
    from factory.job import load_job
    from factory.pipeline import run_job

    job = load_job(None, {"model": str(model), "input.paths": [str(prompts)], "output.dir": str(scratch / "job"),
                          "sampling.max_tokens": config.max_tokens, "sampling.temperatures": list(config.temperatures),
                          "sampling.top_p": config.top_p, "sampling.seed": config.seed, "servers.urls": [url],
                          "servers.model_name": model_name, "servers.concurrency": config.concurrency,
                          "render.max_length": config.max_length,
                          # As the stage-alone capture above measures it (the vllm backend would
                          # start a capture server of its own beside the bench's server).
                          "capture.backend": "transformers"})
    started = time.perf_counter()
    report = run_job(job, media=MediaPaths(), show_progress=False)
    wall = time.perf_counter() - started
    run = report["this_run"]
    elapsed = run["elapsed_s"]
    return {"samples": report["samples"], "tokens": report["tokens"], "quarantined": report["quarantined"],
            "elapsed_s": elapsed, "wall_s": wall, "startup_s": wall - elapsed, "startup": run["startup"],
            "samples_per_s": report["samples"] / elapsed, "tokens_per_s": report["tokens"] / elapsed,
            "stages": run["stages"]}


def _default_model() -> Path:
    from factory.default_model import DefaultModelConfig, prepare_default

    return prepare_default(DefaultModelConfig(engine_check=False))


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = {f.name: f.default for f in dataclasses.fields(BenchFactoryConfig)}
    parser.add_argument("--model", type=Path, default=None,
                        help="a local model directory (default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--server-url", default=None,
                        help="benchmark against this running vLLM server (default: start one with the job's flags)")
    parser.add_argument("--samples", type=int, default=default["samples"], help="prompts timed (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=default["warmup"],
                        help="other prompts every mode runs first, untimed (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=default["max_tokens"],
                        help="max tokens per answer (default %(default)s)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(default["temperatures"]),
                        help="the temperature mix (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=default["top_p"])
    parser.add_argument("--concurrency", type=int, default=default["concurrency"],
                        help="requests in flight, both clients (default %(default)s)")
    parser.add_argument("--passes", type=int, default=default["passes"],
                        help="timed passes per mode, in rotating order (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=default["max_length"],
                        help="render cap and the server's --max-model-len (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--no-stages", action="store_true", help="skip timing each stage alone")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end factory job")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")


def run_cli(args: argparse.Namespace) -> int:
    try:
        config = BenchFactoryConfig(model=args.model, server_url=args.server_url, samples=args.samples,
                                    warmup=args.warmup, max_tokens=args.max_tokens,
                                    temperatures=tuple(args.temperatures), top_p=args.top_p,
                                    concurrency=args.concurrency, passes=args.passes, max_length=args.max_length,
                                    seed=args.seed, stages=not args.no_stages, end_to_end=not args.no_end_to_end)
    except ValueError as e:
        print(f"specmill bench factory: {e}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    figures = run_bench(config)
    print(format_report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures: {args.json}")
    return 0
