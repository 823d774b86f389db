"""The README's main command, end to end, as a new user runs it: `specmill demo --quick` in a
home directory that is empty when it starts and an environment without RAY_*/SPECMILL_*
variables (state in ~/.ray once hid a demo that hung on every fresh machine). Checks the
artifacts, not only the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.demo import StepFailed, write_held_out
from shared.manifest import load_manifest

from processes import run_tree


@pytest.mark.slow
def test_the_quick_demo_runs_end_to_end_in_an_empty_home(tmp_path: Path):
    home, work = tmp_path / "home", tmp_path / "demo"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPECMILL_"))} | {"HOME": str(home)}
    started = time.monotonic()
    proc = run_tree([sys.executable, "-m", "shared.cli", "demo", "--quick", "--workdir", str(work)], env=env,
                    merge_stderr=True, timeout=1800)
    seconds = time.monotonic() - started
    print(f"demo --quick took {seconds:.0f} s")
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert not proc.leftovers  # its service, Ray cluster and vLLM servers all stopped with it

    # The shards verify; the training run held samples out and its figure says so.
    verify = subprocess.run([sys.executable, "-m", "shared.cli", "shards", "verify", str(work / "data")], env=env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert load_manifest(work / "data").rows > 0
    results = json.loads((work / "eval" / "eval.json").read_text())
    assert set(results["ways"]) == {"none", "ngram", "eagle3"}
    # The export checked itself in vLLM on the run's held-out samples, by default.
    check = json.loads((work / "draft" / "check.json").read_text())
    assert check["passed"] and check["engine"] == "vllm" and "held-out samples" in check["prompts"], check
    # The exported draft loaded in vLLM and drafted: vLLM counted its proposals.
    eagle = results["ways"]["eagle3"]
    assert eagle["drafts"] > 0 and eagle["acceptance_length"] >= 1.0
    assert results["ways"]["none"]["drafts"] == 0 and results["ways"]["none"]["output_tokens_per_s"] > 0
    sim = results["simulated_acceptance_length"]
    assert sim["available"] and sim["simulated_acceptance_length_split"] == "val"
    assert "resampled conversations it did not train on" in proc.stdout
    # The progress of the factory step reached the terminal while it ran.
    assert "rows |" in proc.stdout
    # specmill's own Ray token, never one in the user's home.
    assert not (home / ".ray").exists()


def _chats(path: Path, *questions: str) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "an answer"}]}) + "\n"
                            for q in questions))
    return path


def test_held_out_prompts_skip_any_question_a_training_conversation_asks(tmp_path: Path):
    training = [_chats(tmp_path / "a.jsonl", "add 2 and 3", "hi"), _chats(tmp_path / "b.jsonl", "how are you?")]
    candidates = _chats(tmp_path / "c.jsonl", "hi", "name a colour", "how are you?", "name a colour", "spell cat")
    write_held_out(candidates, training, tmp_path / "eval.jsonl", 2)
    kept = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert kept == ["name a colour", "spell cat"]  # neither a training question nor twice
    with pytest.raises(StepFailed, match="only 2 of the 3 evaluation prompts"):
        write_held_out(candidates, training, tmp_path / "eval3.jsonl", 3)
    assert not (tmp_path / "eval3.jsonl").exists()
