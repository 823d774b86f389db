"""`specmill bench train` on a tiny target: the loop and the pure-compute pass see the same batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.bench.train import BenchTrainConfig, run_bench


def test_loop_and_pure_compute_are_measured_on_the_same_batches(tiny_target, synth_data):
    report = run_bench(BenchTrainConfig(target=tiny_target, data=synth_data, token_budget=160, ttt_steps=2,
                                        draft_vocab_size=128, steps=3, warmup=1, rounds=2))
    assert report["data"] == {"path": str(synth_data), "synthetic": False}
    for r in report["rounds"]:
        loop, compute = r["loop"], r["compute"]
        assert loop["steps"] == compute["steps"] == 3
        assert loop["tokens"] == compute["tokens"] > 0  # same seed: the very same batches
        assert 0 <= loop["data_wait_fraction"] < 1 and loop["seconds"] > 0 and compute["seconds"] > 0
        assert r["ratio"] == pytest.approx(compute["seconds"] / loop["seconds"])
    assert set(report["breakdown_s"]) == {"target_head", "draft_forward_and_loss", "backward", "optimizer"}
    assert all(v > 0 for v in report["breakdown_s"].values())


def test_bench_train_command_writes_its_report_on_synthetic_shards_of_the_targets_shape(tiny_target, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "shared.cli", "bench", "train", "--target", str(tiny_target),
                           "--synth-samples", "24", "--token-budget", "128", "--ttt-steps", "2",
                           "--draft-vocab-size", "100", "--steps", "2", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout and "data wait" in done.stdout
    report = json.loads(out.read_text())
    assert report["data"]["synthetic"] is True and report["rounds"][0]["loop"]["tokens"] > 0


def test_bench_train_refuses_a_target_without_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="--target"):
        BenchTrainConfig(target=tmp_path)
