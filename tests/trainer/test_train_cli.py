"""`specmill train` / `specmill export` and the one place config is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, DraftConfig, TrainConfig, load_config, parse_override

from machine import thp_mode

REPO = Path(__file__).parents[2]


def specmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_toml_then_flags_build_the_config_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "train.toml").write_text(
        'out = "runs/a"\nsteps = 100\n[data]\npath = "shards"\ntoken_budget = 1024\n'
        '[target]\npath = "/models/t"\n[optim]\nlr = 3e-4\nbetas = [0.9, 0.99]\n')
    config = load_config(tmp_path / "train.toml", {"steps": 7, "ttt.steps": 3})
    assert isinstance(config, TrainConfig)
    assert config.out == tmp_path / "runs/a" and config.data.path == tmp_path / "shards"
    assert config.target.path == Path("/models/t")
    assert (config.steps, config.ttt.steps, config.data.token_budget, config.data.max_seq_len) == (7, 3, 1024, 1024)
    assert config.optim.betas == (0.9, 0.99) and config.optim.lr == 3e-4
    assert config.ttt.step_decay == 0.8  # dataclass default


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 5, "target.path": "t", "out": "o"}, "data.path is required.*--data"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "data.tokne_budget": 5}, "unknown field.*data.tokne_budget"),
    ({"steps": 0, "data.path": "d", "target.path": "t", "out": "o"}, "steps must be positive"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "eval_every": 5}, "data.val_samples"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "optim.schedule": "linear"}, "optim.schedule"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "data.temperatures": [-1]}, "data.temperatures"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "data.temperatures": []}, "data.temperatures"),
    ({"steps": 5, "data.path": "d", "target.path": "t", "out": "o", "draft.norm_output": "yes"}, "draft.norm_output"),
])
def test_bad_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_set_parses_toml_values():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("device=cpu") == ("device", "cpu")
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("draft.norm_before_fc=true") == ("draft.norm_before_fc", True)
    config = load_config(None, dict(parse_override(f"{k}=true") for k in ("draft.norm_before_fc", "draft.norm_output"))
                         | {"steps": 5, "data.path": "d", "target.path": "t", "out": "o"})
    assert (config.draft.norm_before_fc, config.draft.norm_output) == (True, True)
    assert (DraftConfig().norm_before_fc, DraftConfig().norm_output) == (False, False)  # off until measured


def test_train_then_export_from_the_command_line(tmp_path, synth_data, tiny_target):
    toml = tmp_path / "train.toml"
    toml.write_text(f'out = "run"\nsteps = 2\nlog_every = 1\n[data]\npath = "{synth_data}"\ntoken_budget = 128\n'
                    f'[target]\npath = "{tiny_target}"\n[draft]\ndraft_vocab_size = 64\n[ttt]\nsteps = 2\n')
    trained = specmill("train", str(toml), "--no-progress", "--set", "optim.lr=2e-4", "--temperatures", "0", "1")
    assert trained.returncode == 0, trained.stderr
    assert "trained to step 2" in trained.stdout
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["config"]["optim"]["lr"] == 2e-4 and meta["config"]["draft"]["draft_vocab_size"] == 64
    assert meta["config"]["data"]["temperatures"] == [0.0, 1.0]
    # --no-check: 2 steps on a random target draft at chance (the check: test_export_check.py)
    exported = specmill("export", str(tmp_path / "run"), "--format", "eagle", "--out", str(tmp_path / "draft"),
                        "--no-check")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "draft" / "config.json").read_text())["draft_vocab_size"] == 64


def test_train_without_data_says_which_flag_is_missing(tmp_path):
    bad = specmill("train", "--target", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "3")
    assert bad.returncode == 2 and "data.path is required" in bad.stderr and "--data" in bad.stderr


_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "huge":
    from trainer.train import huge_page_tensors
    huge_page_tensors()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(256 << 20, dtype=torch.uint8).fill_(1)  # allocated, touched, freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_specmill_train_puts_large_tensors_in_huge_pages():
    """A 256 MB tensor faults in 2 MiB at a time (128 faults and change), not 4 KiB (65k)."""
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**env, "PYTHONPATH": str(Path(__file__).parents[2])})
        return int(out.stdout.split()[-1])

    default, huge = faults("default"), faults("huge")
    assert huge < default / 20, (huge, default)
    if thp_mode() == "madvise":  # "always" gives huge pages without asking
        assert default > (256 << 20) // 4096 // 2, f"4 KiB pages expected by default ({default} faults)"
