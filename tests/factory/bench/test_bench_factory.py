"""`specmill bench factory`: its prompts, settings, arithmetic and JSON, and a tiny real run."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from factory.bench.factory import (BenchFactoryConfig, _Request, bench_chats, format_report, plain_load,
                                   summarize)
from factory.render import conversation_id
from shared.cli import main


def test_bench_chats_are_distinct_reproducible_and_warmup_never_repeats_a_timed_one():
    timed, warm = bench_chats(40, seed=3, skip=8), bench_chats(8, seed=3)
    assert timed == bench_chats(40, seed=3, skip=8) and timed != bench_chats(40, seed=4, skip=8)
    ids = {conversation_id(m[:-1]) for m in timed + warm}  # the prompt side, as resampling sees it
    assert len(ids) == 48
    assert all(m[-1]["role"] == "assistant" and m[-2]["role"] == "user" for m in timed)
    with pytest.raises(ValueError, match="distinct prompts"):
        bench_chats(10_000)


def test_bad_bench_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="concurrency"):
        BenchFactoryConfig(concurrency=0)
    with pytest.raises(ValueError, match="max_length"):
        BenchFactoryConfig(max_tokens=512, max_length=256)
    with pytest.raises(ValueError, match="server_url"):
        BenchFactoryConfig(server_url="localhost:8000")
    with pytest.raises(ValueError, match="samples \\+ warmup"):
        BenchFactoryConfig(samples=1000)
    assert main(["bench", "factory", "--passes", "0"]) == 2


def made_up_figures(config: BenchFactoryConfig, resampler_s: float) -> dict:
    timed = {"resampler": {"tokens": 4000, "seconds": resampler_s, "requests": 64,
                           "pass_tokens_per_s": [2000 / (resampler_s - 9), 2000 / 9]},
             "plain": {"tokens": 4100, "seconds": 20.0, "requests": 64, "pass_tokens_per_s": [2050 / 11, 2050 / 9]},
             "plain_2x": {"tokens": 4050, "seconds": 19.0, "requests": 64, "pass_tokens_per_s": [200.0, 220.0]}}
    stages = {"read": {"samples": 32, "tokens": 1500, "seconds": 0.01},
              "resample": {"samples": 64, "tokens": 4000, "seconds": resampler_s},
              "render": {"samples": 32, "tokens": 9000, "seconds": 0.5},
              "capture": {"samples": 32, "tokens": 9000, "seconds": 30.0},
              "write": {"samples": 32, "tokens": 9000, "seconds": 0.2}}
    e2e = {"samples": 32, "tokens": 9000, "quarantined": 0, "elapsed_s": 60.0, "wall_s": 80.0, "startup_s": 20.0,
           "startup": {}, "samples_per_s": 32 / 60, "tokens_per_s": 150.0,
           "stages": {"read": {"samples": 32, "per_s": 0.5},
                      "resample": {"samples": 32, "generated_tokens": 2000, "tokens_per_s": 33.3},
                      "capture": {"samples": 32, "tokens": 9000, "tokens_per_s": 150.0},
                      "write": {"samples": 32, "per_s": 0.5}, "quarantine": {"samples": 0}}}
    figures = summarize(config, model="/m/SmolLM2", data={"samples": 32, "prompt_tokens": 1500, "warmup": 8},
                        timed=timed, stages=stages, end_to_end=e2e,
                        machine={"cpus": 2, "load_avg_start": [1.0, 1.0, 1.0], "load_avg_end": [2.0, 2.0, 2.0]})
    figures["server"] = "http://x"
    return figures


@pytest.mark.parametrize("resampler_s", [20.0, 25.0])
def test_verdict_is_the_ratio_of_generated_tokens_per_second_to_the_plain_client(resampler_s):
    config = BenchFactoryConfig(passes=2)
    figures = made_up_figures(config, resampler_s)
    rate = {r["mode"]: r["tokens_per_s"] for r in figures["results"]}
    assert rate == pytest.approx({"resampler": 4000 / resampler_s, "plain": 4100 / 20.0, "plain_2x": 4050 / 19.0})
    v = figures["verdict"]["resampler_vs_plain"]
    assert v["value"] == pytest.approx(rate["resampler"] / rate["plain"]) and v["goal"] == 0.95
    assert v["pass"] == (v["value"] >= 0.95) and v["pass"] == (resampler_s == 20.0)
    assert figures["ratios"]["plain_2x_vs_plain"] == pytest.approx(rate["plain_2x"] / rate["plain"])
    assert figures["ratios"]["resampler_vs_plain_per_pass"] == pytest.approx(
        [(2000 / (resampler_s - 9)) / (2050 / 11), 2000 / 2050])
    assert [r["concurrency"] for r in figures["results"]] == [32, 32, 64]
    assert figures["ratios"]["slowest_stage"] == "capture"
    capture = figures["stages"]["capture"]
    assert capture["samples_per_s"] == pytest.approx(32 / 30.0) and capture["tokens_per_s"] == pytest.approx(300.0)
    report = format_report(figures)
    assert ("PASS" in report) == v["pass"] and ("FAIL" in report) != v["pass"]
    assert "slowest stage: capture" in report and "end-to-end job (32 samples" in report
    assert "pass by pass: " in report
    again = json.loads(json.dumps(figures))  # what --json writes
    assert again["verdict"] == figures["verdict"] and set(again["stages"]) == {"read", "resample", "render",
                                                                                "capture", "write"}


class _CountingServer(BaseHTTPRequestHandler):
    """A stand-in completions endpoint that records how many requests are in flight at once."""

    in_flight = peak = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).in_flight += 1
            type(self).peak = max(type(self).peak, type(self).in_flight)
        threading.Event().wait(0.05)
        with self.lock:
            type(self).in_flight -= 1
        data = json.dumps({"usage": {"completion_tokens": body["max_tokens"] - body["seed"] % 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_plain_load_keeps_exactly_its_concurrency_in_flight_and_sums_reported_tokens():
    # A real HTTP server in a thread: vLLM itself is in the slow test below.
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CountingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    requests = [_Request(prompt=None, prompt_ids=[1, 2], temperature=0.0, seed=i) for i in range(24)]

    async def go() -> int:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{httpd.server_port}") as client:
            return await plain_load(client, "m", requests, max_tokens=10, top_p=1.0, concurrency=6)

    try:
        total = asyncio.run(go())
    finally:
        httpd.shutdown()
    assert total == sum(10 - i % 2 for i in range(24))
    assert _CountingServer.peak == 6


@pytest.mark.slow
def test_tiny_bench_runs_every_mode_and_stage_against_a_real_vllm_server(tmp_path):
    out = tmp_path / "factory.json"
    assert main(["bench", "factory", "--samples", "8", "--warmup", "2", "--max-tokens", "16", "--passes", "1",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert [r["mode"] for r in figures["results"]] == ["resampler", "plain", "plain_2x"]
    for r in figures["results"]:
        assert r["requests"] == 8 and 8 <= r["generated_tokens"] <= 8 * 16
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["seconds"])
    assert set(figures["stages"]) == {"read", "resample", "render", "capture", "write"}
    assert all(s["samples"] == 8 and s["seconds"] > 0 for s in figures["stages"].values())
    e2e = figures["end_to_end"]
    assert e2e["samples"] + e2e["quarantined"] == 8 and e2e["stages"]["write"]["samples"] == e2e["samples"]
