import json
import subprocess
import sys


def specmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True)


def test_synth_then_inspect_reports_what_was_written(tmp_path):
    out = tmp_path / "ds"
    made = specmill("shards", "synth", "--out", str(out), "--samples", "5", "--hidden", "48",
                    "--mean-tokens", "30", "--vocab", "300")
    assert made.returncode == 0, made.stderr
    assert "5 samples" in made.stdout

    shown = specmill("shards", "inspect", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["samples"] == 5 and summary["hidden_size"] == 48 and summary["complete"]
    assert summary["aux_layer_convention"] == "residual_entering_layer"

    one = specmill("shards", "inspect", str(out), "--sample", "2")
    assert one.returncode == 0, one.stderr
    assert "aux_hidden_states: (" in one.stdout and ", 3, 48) torch.bfloat16" in one.stdout


def test_synth_rejects_a_bad_size_naming_the_field(tmp_path):
    bad = specmill("shards", "synth", "--out", str(tmp_path / "x"), "--samples", "0", "--hidden", "8")
    assert bad.returncode != 0
    assert "samples must be positive" in bad.stderr


def test_inspect_of_a_directory_without_manifest_says_so(tmp_path):
    bad = specmill("shards", "inspect", str(tmp_path))
    assert bad.returncode != 0
    assert "no manifest" in bad.stderr
