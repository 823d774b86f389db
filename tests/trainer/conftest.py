"""Tiny real things for the trainer tests: a random-weight Llama target saved as a HF
directory, a synthetic shard data set at its size, and a data set whose hidden states come
from running that target on its own samples (so there is something to learn); for the `slow`
tests, a draft of the real default target."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.synth import SynthConfig, write_synthetic
from trainer_fixtures import HIDDEN, LAYERS, VOCAB, build_default_dataset, save_tiny_target, write_self_generated

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("target") / "tiny-llama")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(out, SynthConfig(samples=40, hidden_size=HIDDEN, vocab=VOCAB, num_layers=LAYERS,
                                     mean_tokens=40, max_tokens=96))
    return out


@pytest.fixture(scope="session")
def real_data(tmp_path_factory, tiny_target) -> Path:
    return write_self_generated(tmp_path_factory.mktemp("data") / "real", tiny_target, samples=64)


@dataclass(frozen=True, slots=True)
class DefaultDraft:
    target: Path  # the default target's HF directory
    run: Path  # the training run (`specmill train --out`)
    draft: Path  # its export, --format eagle


def train_default_draft(root: Path, *flags: str) -> DefaultDraft:
    """A draft of the default target trained 30 steps on its own answers to 8 questions (no
    held-out split), with the `specmill` commands a user types (`flags` added to `train`)."""
    from factory.default_model import DefaultModelConfig, prepare_default

    def specmill(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]

    target = prepare_default(DefaultModelConfig(engine_check=False))
    build_default_dataset(target, root / "data")
    specmill("train", "--data", str(root / "data"), "--target", str(target), "--out", str(root / "run"),
             "--steps", "30", "--device", "cpu", "--token-budget", "512", "--draft-vocab-size", "2048",
             "--ttt-steps", "3", "--lr", "1e-3", "--precision", "fp32", "--no-progress", *flags)
    specmill("export", str(root / "run"), "--format", "eagle", "--out", str(root / "draft"), "--no-check")
    return DefaultDraft(target=target, run=root / "run", draft=root / "draft")


@pytest.fixture(scope="session")
def default_draft(tmp_path_factory) -> DefaultDraft:
    return train_default_draft(tmp_path_factory.mktemp("default-draft"))


@pytest.fixture(scope="session")
def normed_default_draft(tmp_path_factory) -> DefaultDraft:
    """The same with both EAGLE 3.1 norms on (draft.norm_before_fc, draft.norm_output)."""
    return train_default_draft(tmp_path_factory.mktemp("default-draft-normed"), "--set", "draft.norm_before_fc=true",
                               "--set", "draft.norm_output=true")
