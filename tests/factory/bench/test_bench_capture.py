"""`specmill bench capture`: made-up conversations, and a tiny real run through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.bench.capture import BenchCaptureConfig, format_report, render_rows
from factory.bench.conversations import bench_conversations
from factory.default_model import DefaultModelConfig, prepare_default
from factory.targets import Frontend, TargetConfig
from shared.cli import main


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return prepare_default(DefaultModelConfig(engine_check=False))


def test_bench_conversations_are_reproducible_varied_and_render(smollm_dir):
    convs = bench_conversations(24, seed=5)
    assert [c.messages for c in convs] == [c.messages for c in bench_conversations(24, seed=5)]
    assert [c.messages for c in convs] != [c.messages for c in bench_conversations(24, seed=6)]
    assert {sum(m["role"] == "assistant" for m in c.messages) for c in convs} >= {1, 2}
    rows = render_rows(Frontend.load(TargetConfig(model=smollm_dir)), convs, 2048)
    lengths = sorted(r.num_tokens for r in rows)
    assert lengths[0] < 150 and lengths[-1] > 600, lengths  # short and long rows, so batches pad
    assert all(r.loss_mask.sum() > 0 for r in rows)
    assert [c.source_index for c in bench_conversations(2, start_index=10)] == [10, 11]


def test_bad_bench_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="backends"):
        BenchCaptureConfig(backends=("sglang",))
    with pytest.raises(ValueError, match="samples"):
        BenchCaptureConfig(samples=0)
    assert main(["bench", "capture", "--backends", "nope"]) == 2


@pytest.fixture(scope="module")
def figures(tmp_path_factory, smollm_dir):
    out = tmp_path_factory.mktemp("bench") / "capture.json"
    assert main(["bench", "capture", "--model", str(smollm_dir), "--samples", "4", "--warmup", "1",
                 "--vllm-passes", "1", "--max-length", "1024", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_reports_every_mode_of_both_backends_with_consistent_figures(figures):
    modes = [(r["backend"], r["mode"]) for r in figures["results"]]
    assert modes == [("transformers", "plain_forward"), ("transformers", "capture"),
                     ("transformers", "one_per_forward"), ("vllm", "plain_prefill"), ("vllm", "capture")]
    data = figures["data"]
    assert data["samples"] == 4 and data["min_tokens"] <= data["mean_tokens"] <= data["max_tokens"] <= 1024
    for r in figures["results"]:
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        passes = r.get("passes", 1)
        assert r["tokens"] == data["tokens"] * passes


@pytest.mark.slow
def test_bench_verdicts_are_the_capture_to_plain_ratios_against_the_goal(figures):
    by = {(r["backend"], r["mode"]): r["tokens_per_s"] for r in figures["results"]}
    verdict = figures["verdict"]
    assert set(verdict) == {"transformers_capture_vs_plain_forward", "vllm_capture_vs_plain_prefill"}
    for key, (capture, plain) in {"transformers_capture_vs_plain_forward": (("transformers", "capture"),
                                                                            ("transformers", "plain_forward")),
                                  "vllm_capture_vs_plain_prefill": (("vllm", "capture"), ("vllm", "plain_prefill"))
                                  }.items():
        v = verdict[key]
        assert v["value"] == pytest.approx(by[capture] / by[plain]) and v["goal"] == 0.9
        assert v["pass"] == (v["value"] >= 0.9)
    ratios = figures["ratios"]
    assert ratios["vllm_capture_vs_transformers_capture"] == pytest.approx(by["vllm", "capture"]
                                                                           / by["transformers", "capture"])
    assert ratios["transformers_capture_vs_one_per_forward"] == pytest.approx(
        by["transformers", "capture"] / by["transformers", "one_per_forward"])
    load = figures["machine"]
    assert len(load["load_avg_start"]) == 3 and len(load["load_avg_end"]) == 3


@pytest.mark.slow
def test_bench_report_prints_a_verdict_per_backend(figures):
    report = format_report(figures)
    assert report.count(">= 0.90") == 2 and len([w for w in report.split() if w in ("PASS", "FAIL")]) == 2
    assert "load average" in report
