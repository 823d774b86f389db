"""Data parallelism with torchrun on CPU (gloo): 2 ranks train exactly like 1 rank with the
same global batch, and FSDP trains and resumes like DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, read_meta
from trainer.run_layout import STATE_FILE
from trainer.train import train
from trainer_fixtures import run_config

STEPS = 4
# One setting for every run here; the rank count, micro-batches and strategy vary.
SETTINGS = {"steps": STEPS, "data.token_budget": 160, "draft.draft_vocab_size": 128, "ttt.steps": 2,
            "optim.lr": 1e-2, "optim.warmup_fraction": 0.0, "log_every": 1, "checkpoint.every": 0, "seed": 3,
            "precision": "fp32"}


def torchrun(out: Path, data: Path, target: Path, *settings: str) -> None:
    flags = [f"--set={k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in SETTINGS.items()
             if k not in ("steps", "seed")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shared.cli", "train", "--data", str(data), "--target", str(target), "--out", str(out),
           "--steps", str(STEPS), "--seed", str(SETTINGS["seed"]), "--no-progress", *flags,
           *(f"--set={s}" for s in settings)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr[done.stderr.find("Traceback"):][:4000] or done.stderr[-4000:]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(out / "checkpoints") / STATE_FILE, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synth_data, tiny_target) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(out, synth_data, tiny_target)
    return out


@pytest.mark.slow  # torchrun starts two training processes
def test_two_ranks_train_like_one_rank_with_the_same_global_batch(ddp_run, tmp_path, synth_data, tiny_target):
    """2 ranks x 1 micro-batch and 1 rank x 2 micro-batches: the same micro-batches per step
    (one global stream), gradients averaged alike, so the same losses and weights (up to the
    float summation order of two processes with one thread each vs one with two)."""
    single = tmp_path / "single"
    train(run_config(single, synth_data, tiny_target, **SETTINGS, **{"data.micro_batches": 2}))
    assert len(losses(ddp_run)) == STEPS
    assert losses(ddp_run) == pytest.approx(losses(single), rel=1e-5)
    assert losses(single)[-1] < losses(single)[0]  # it trained
    assert_same_weights(weights(ddp_run), weights(single))


@pytest.mark.slow  # torchrun starts two training processes
def test_fsdp_trains_and_resumes_like_ddp(ddp_run, tmp_path, synth_data, tiny_target):
    out = tmp_path / "fsdp"
    torchrun(out, synth_data, tiny_target, "distributed.strategy=fsdp", f"stop_after={STEPS // 2}")
    meta = read_meta(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == STEPS // 2 and meta["identity"]["distributed.strategy"] == "fsdp"
    assert set(weights(out)) == set(weights(ddp_run))  # full tensors, as export reads them
    torchrun(out, synth_data, tiny_target, "distributed.strategy=fsdp")  # resumes
    assert losses(out) == pytest.approx(losses(ddp_run), rel=1e-5)
    assert_same_weights(weights(out), weights(ddp_run))
