"""Tiny real things for the trainer tests: a random-weight Llama target saved as a HF
directory, a synthetic shard data set at its size, and a data set whose hidden states come
from running that target on its own samples (so there is something to learn)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.synth import SynthConfig, write_synthetic
from trainer_fixtures import HIDDEN, LAYERS, VOCAB, save_tiny_target, write_self_generated


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
