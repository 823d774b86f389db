"""The training loop: exact resume, refusal of foreign checkpoints, SIGTERM, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointMismatch, latest_checkpoint, read_meta
from trainer.export import load_exported
from trainer.run_layout import META_FILE, STATE_FILE
from trainer.train import train
from trainer_fixtures import export_eagle, run_config


def model_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(out / "checkpoints") / STATE_FILE, weights_only=True)["model"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumed_run_continues_bit_for_bit_like_an_uninterrupted_one(tmp_path, synth_data, tiny_target, precision):
    straight = train(run_config(tmp_path / "straight", synth_data, tiny_target, precision=precision))
    assert len(straight.losses) == 30

    first = train(run_config(tmp_path / "resumed", synth_data, tiny_target, stop_after=10, precision=precision))
    assert first.stopped_early and first.step == 10
    assert first.losses == straight.losses[:10]
    meta = read_meta(first.checkpoint)
    assert meta["step"] == 10 and meta["world_size"] == 1
    assert set(meta["data_position"]) == {"epoch", "cursor"}  # the global stream's

    again = train(run_config(tmp_path / "resumed", synth_data, tiny_target, stop_after=10, precision=precision))
    assert again.step == 10 and again.losses == [] and again.stopped_early  # the same command: nothing to do

    other = "bf16" if precision == "fp32" else "fp32"
    with pytest.raises(CheckpointMismatch, match=f"precision: checkpoint '{precision}' != now '{other}'"):
        train(run_config(tmp_path / "resumed", synth_data, tiny_target, precision=other))

    second = train(run_config(tmp_path / "resumed", synth_data, tiny_target, precision=precision))
    assert second.step == 30 and len(second.losses) == 20
    assert second.losses == straight.losses[10:]  # exact float equality, step by step
    a, b = model_state(tmp_path / "straight"), model_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 31))
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 0


def test_bf16_autocast_trains_like_fp32_within_rounding(tmp_path, synth_data, tiny_target):
    fp32 = train(run_config(tmp_path / "fp32", synth_data, tiny_target, steps=8, precision="fp32"))
    bf16 = train(run_config(tmp_path / "bf16", synth_data, tiny_target, steps=8, precision="bf16"))
    assert fp32.losses != bf16.losses, "bf16 autocast changed nothing: it is not engaged"
    for a, b in zip(fp32.losses, bf16.losses):
        assert abs(a - b) <= 0.03 * abs(a), (fp32.losses, bf16.losses)
    master = model_state(tmp_path / "bf16")
    assert all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in master.values()), \
        "master weights stay fp32 under autocast"


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_bf16_matrix_instructions(monkeypatch):
    from trainer.config import resolve_precision

    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for amx, avx512_bf16, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_precision("auto", "cpu") == expected


def test_a_bad_precision_is_refused_naming_the_field(tmp_path, synth_data, tiny_target):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of .*'fp16'"):
        run_config(tmp_path / "x", synth_data, tiny_target, precision="fp16")


def test_a_checkpoint_from_another_config_or_data_set_is_refused(tmp_path, synth_data, real_data, tiny_target):
    out = tmp_path / "run"
    train(run_config(out, synth_data, tiny_target, stop_after=2))
    with pytest.raises(CheckpointMismatch, match=r"optim\.lr: checkpoint 0\.001 != now 0\.002"):
        train(run_config(out, synth_data, tiny_target, **{"optim.lr": 2e-3}))
    with pytest.raises(CheckpointMismatch, match="data set fingerprint"):
        train(run_config(out, real_data, tiny_target))
    # run-control settings may change: a longer logging interval resumes fine
    assert train(run_config(out, synth_data, tiny_target, steps=30, stop_after=3, log_every=5)).step == 3


def test_a_checkpoint_from_before_a_field_existed_resumes_with_that_fields_old_behaviour(
        tmp_path, synth_data, tiny_target):
    out = tmp_path / "run"
    first = train(run_config(out, synth_data, tiny_target, stop_after=2, precision="fp32"))
    meta_file = first.checkpoint / META_FILE
    meta = json.loads(meta_file.read_text())
    # as written before they existed
    for field in ("precision", "data.temperatures", "draft.norm_before_fc", "draft.norm_output"):
        del meta["identity"][field]
    for field in ("norm_before_fc", "norm_output"):
        del meta["arch"][field]
    meta_file.write_text(json.dumps(meta))
    old = load_exported(export_eagle(first.checkpoint, tmp_path / "old-draft"))
    assert (old.arch.norm_before_fc, old.arch.norm_output, old.input_norm) == (False, False, None)
    with pytest.raises(CheckpointMismatch, match="precision: checkpoint 'fp32' != now 'bf16'"):
        train(run_config(out, synth_data, tiny_target, stop_after=3, precision="bf16"))
    with pytest.raises(CheckpointMismatch, match="draft.norm_output: checkpoint False != now True"):
        train(run_config(out, synth_data, tiny_target, stop_after=3, **{"draft.norm_output": True}))
    assert train(run_config(out, synth_data, tiny_target, stop_after=3, precision="fp32")).step == 3


def test_a_checkpoint_from_before_elastic_resume_resumes_bit_for_bit(tmp_path, synth_data, tiny_target):
    """Older checkpoints kept the rank count in the identity, one data position per rank and
    the optimizer in torch's layout (keyed by parameter index): they resume as they were."""
    straight = train(run_config(tmp_path / "straight", synth_data, tiny_target, steps=6))
    out = tmp_path / "run"
    first = train(run_config(out, synth_data, tiny_target, steps=6, stop_after=3))
    meta = json.loads((first.checkpoint / META_FILE).read_text())
    del meta["identity"]["global_micro_batches"], meta["world_size"]
    meta["identity"]["world_size"] = 1  # and no data.micro_batches: written before it existed
    meta["data_position"] = [meta["data_position"]]
    (first.checkpoint / META_FILE).write_text(json.dumps(meta))
    state = torch.load(first.checkpoint / STATE_FILE, weights_only=True)
    state["data"] = {"world_size": 1, "ranks": [state["data"]]}
    optim = state["optimizer"]
    index = {name: i for i, name in enumerate(n for group in optim["param_groups"] for n in group["params"])}
    state["optimizer"] = {"state": {index[n]: v for n, v in optim["state"].items()},
                          "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                           for g in optim["param_groups"]]}
    torch.save(state, first.checkpoint / STATE_FILE)

    with pytest.raises(CheckpointMismatch, match=r"global batch: checkpoint 1 micro-batches .* != now 2"):
        train(run_config(out, synth_data, tiny_target, steps=6, **{"data.micro_batches": 2}))
    second = train(run_config(out, synth_data, tiny_target, steps=6))
    assert second.losses == straight.losses[3:]
    a, b = model_state(tmp_path / "straight"), model_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_precision_is_checked_as_what_it_resolved_to(tmp_path, synth_data, tiny_target, monkeypatch):
    import trainer.train as train_module

    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "resolve_precision", lambda precision, device: "fp32")
    first = train(run_config(out, synth_data, tiny_target, stop_after=2, precision="auto"))
    assert json.loads((first.checkpoint / META_FILE).read_text())["identity"]["precision"] == "fp32"
    # the same "auto" on a machine where it means bf16 would change the arithmetic mid-run
    monkeypatch.setattr(train_module, "resolve_precision", lambda precision, device: precision.replace("auto", "bf16"))
    with pytest.raises(CheckpointMismatch, match="precision: checkpoint 'fp32' != now 'bf16'"):
        train(run_config(out, synth_data, tiny_target, stop_after=3, precision="auto"))
    assert train(run_config(out, synth_data, tiny_target, stop_after=3, precision="fp32")).step == 3  # said outright
    # a checkpoint written when identities held the literal "auto" resumes as before
    meta_file = first.checkpoint.parent / "step-000000003" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["identity"]["precision"] = "auto"
    meta_file.write_text(json.dumps(meta))
    assert train(run_config(out, synth_data, tiny_target, stop_after=4, precision="auto")).step == 4


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, synth_data, tiny_target):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "shared.cli", "train", "--data", str(synth_data), "--target", str(tiny_target),
           "--out", str(out), "--steps", "100000", "--token-budget", "160", "--draft-vocab-size", "200",
           "--ttt-steps", "2", "--log-every", "1", "--checkpoint-every", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
    meta = read_meta(latest_checkpoint(out / "checkpoints"))
    assert 3 <= meta["step"] < 100000


def test_draft_learns_the_targets_own_distribution_and_generalises(tmp_path, real_data, tiny_target):
    result = train(run_config(tmp_path / "run", real_data, tiny_target, steps=50, log_every=10,
                              **{"checkpoint.every": 0, "data.token_budget": 512, "data.val_samples": 8,
                                 "draft.draft_vocab_size": 256, "optim.lr": 1e-2, "optim.warmup_fraction": 0.1}))
    train_records = [r for r in result.records if r["split"] == "train"]
    first, last = train_records[0], train_records[-1]
    assert last["loss"] < first["loss"] - 2.0
    assert last["acc"][0] > max(0.2, 3 * first["acc"][0]) and last["al"] > first["al"] + 0.2
    assert 0 <= last["data_wait"] < 1 and last["tokens_per_s"] > 0
    (val,) = [r for r in result.records if r["split"] == "val"]  # held-out samples, never trained on
    assert val["acc"][0] > 0.1 and val["al"] > 1.1  # chance is 1/256


def test_two_data_parallel_ranks_split_the_data_and_resume_together(tmp_path, synth_data, tiny_target):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shared.cli", "train", "--data", str(synth_data), "--target", str(tiny_target), "--out", str(out),
           "--steps", "6", "--token-budget", "160", "--draft-vocab-size", "128", "--ttt-steps", "2",
           "--log-every", "1", "--val-samples", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    first = subprocess.run([*cmd, "--stop-after", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = read_meta(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["identity"]["global_micro_batches"] == 2
    # one global stream, each rank reading its own micro-batches of it: one position for all
    assert set(meta["data_position"]) == {"epoch", "cursor"}

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and second.stdout.count("trained to step 6") == 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "val"] == [6]

    # 1 rank may go on with 2 micro-batches (tests/trainer/test_distributed.py), not with 1
    with pytest.raises(CheckpointMismatch, match=r"global batch: checkpoint 2 micro-batches .* \(2 rank\(s\) x "
                                                 r"data.micro_batches = 1\) != now 1 \(1 rank\(s\) x 1\); to keep "
                                                 r"it on 1 rank\(s\), set data.micro_batches = 2"):
        train(run_config(out, synth_data, tiny_target, steps=6, **{"data.val_samples": 4, "draft.draft_vocab_size": 128,
                                                                  "ttt.steps": 2, "seed": 0, "optim.lr": 1e-4,
                                                                  "checkpoint.every": 500, "log_every": 1}))


def test_a_data_set_on_a_filesystem_uri_trains_like_the_local_one(tmp_path, tiny_target):
    pytest.importorskip("fsspec")
    from shared.synth import SynthConfig, write_synthetic
    from trainer_fixtures import HIDDEN, LAYERS, VOCAB

    config = SynthConfig(samples=24, hidden_size=HIDDEN, vocab=VOCAB, num_layers=LAYERS, mean_tokens=40, max_tokens=96)
    uri = f"memory://specmill-train-test/{tmp_path.name}/data"  # fsspec's in-process filesystem
    write_synthetic(uri, config)
    write_synthetic(tmp_path / "data", config)
    settings = {"steps": 6, "checkpoint.every": 0}
    remote = train(run_config(tmp_path / "remote", uri, tiny_target, **settings))
    local = train(run_config(tmp_path / "local", tmp_path / "data", tiny_target, **settings))
    assert len(remote.losses) == 6 and remote.losses == local.losses
