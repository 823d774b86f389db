"""A factory job on a real two-node Ray cluster on this machine: a head and a worker, each a
separate `ray start` process. The job's capture actors spread over both nodes; the worker node
is killed mid-job (its whole process session, as a machine that loses power); the job still
finishes, with every input row exactly once and the same samples and token counts as a run
on one node."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from factory.default_model import DefaultModelConfig, prepare_default
from factory.job import JobConfigError, RayConfig
from factory.prompts import write_chitchat_prompts
from tiny_models import build_tiny_causal_lm
from shared.manifest import load_manifest
from dataset_contents import read_back
from ray_nodes import RayNode, cluster_env

N_CHATS = 160


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's real tokenizer and chat template."""
    tokenizer_dir = prepare_default(DefaultModelConfig(engine_check=False))
    return build_tiny_causal_lm("llama", tmp_path_factory.mktemp("tiny") / "llama", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_chitchat_prompts(tmp_path_factory.mktemp("prompts") / "chats.jsonl", N_CHATS)


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return cluster_env()


@pytest.fixture(scope="module")
def head(env):
    node = RayNode(name="head", num_cpus=2, resources={"specmill_head": 1}, env=env)
    try:
        yield node.start()
    finally:
        node.kill()
        assert not node.pids(), "head node processes survived the clean-up"


def write_job(path: Path, model: Path, prompts: Path, out: Path, address: str) -> Path:
    """Two capture actors spread over the nodes, small batches so the job lasts long enough to
    be interrupted; keep_original_answers: no vLLM server, the data set's own answers."""
    path.write_text(f'model = "{model}"\n'
                    f'[input]\npaths = ["{prompts}"]\n'
                    f'[output]\ndir = "{out}"\ncommit_every = 8\n'
                    f'[sampling]\nkeep_original_answers = true\n'
                    f'[capture]\nbackend = "transformers"\nnum_cpus = 1\nmax_batch_size = 2\n'
                    f'[ray]\naddress = "{address}"\ncapture_actors = 2\nscheduling = "SPREAD"\nresamplers = 2\n'
                    f'batch_size = 2\ncapture_batch = 2\nmax_in_flight = 8\nactor_max_restarts = 3\n')
    return path


def start_job(job: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "factory", "run", str(job), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env})


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[dict, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the job did not finish in {timeout} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    # Ray prints some of its own lines to stdout; the report is the indented JSON object at the end.
    start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
    return json.JSONDecoder().raw_decode(stdout, start)[0], stderr


def contents(out: Path) -> dict:
    """What a finished data set holds, in a form two runs can be compared by."""
    manifest, samples, quarantine = read_back(out)
    return {
        "sample_ids": sorted(s["sample_id"] for s in samples),
        "rows": sorted([s["source_index"] for s in samples] + [q["index"] for q in quarantine]),
        "tokens_by_sample": sorted((s["sample_id"], s["input_ids"].tolist()) for s in samples),
        "token_counts": manifest.token_counts,
        "tokens": manifest.tokens,
    }


def capture_actor_pids(node: RayNode) -> list[int]:
    pids = []
    for pid in node.pids():
        try:
            if "_CaptureActor" in " ".join(psutil.Process(pid).cmdline()):
                pids.append(pid)
        except psutil.NoSuchProcess:
            continue
    return pids


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, head, env, tiny_target, prompts) -> dict:
    """The reference: the same job on the head alone."""
    work = tmp_path_factory.mktemp("one-node")
    job = write_job(work / "job.toml", tiny_target, prompts, work / "out", head.address)
    started = time.monotonic()
    report, _ = finish(start_job(job, env))
    return {"contents": contents(work / "out"), "report": report, "seconds": time.monotonic() - started}


@pytest.mark.slow  # a two-node Ray cluster in subprocesses, a factory job, a node killed: minutes
def test_a_job_survives_losing_a_node_with_every_sample_exactly_once(tmp_path, head, env, tiny_target, prompts,
                                                                     one_node):
    reference = one_node["contents"]
    assert reference["rows"] == list(range(N_CHATS)) and len(reference["sample_ids"]) > N_CHATS // 2
    worker = RayNode(name="worker", num_cpus=2, resources={"specmill_worker": 1}, head_address=head.address,
                     env=env)
    proc = None
    try:
        worker.start()
        out = tmp_path / "out"
        proc = start_job(write_job(tmp_path / "job.toml", tiny_target, prompts, out, head.address), env)
        # Mid-job: the worker node holds a capture actor (SPREAD put it there) and samples are committed.
        deadline = time.monotonic() + 300
        while not (capture_actor_pids(worker) and (out / "manifest.json").exists() and load_manifest(out).rows):
            assert proc.poll() is None, "the job ended before the worker node could be killed"
            assert time.monotonic() < deadline, "no capture actor was placed on the worker node"
            time.sleep(0.05)
        worker.kill()
        at_kill = load_manifest(out)
        assert not at_kill.complete and at_kill.rows < len(reference["sample_ids"]), "the node was killed too late"
        report, stderr = finish(proc)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        worker.kill()
    assert not worker.pids(), "worker node processes survived the clean-up"
    # Work was lost with the node and done again: a batch resubmitted by the driver or an actor restarted.
    assert "lost with its actor" in stderr or "actor restarted after its worker died" in stderr, stderr[-3000:]
    after = contents(out)
    assert after["rows"] == list(range(N_CHATS)), "an input row is missing or duplicated"
    assert len(set(after["sample_ids"])) == len(after["sample_ids"])
    assert after == reference
    assert report["samples"] == one_node["report"]["samples"]
    print(f"\n{N_CHATS} chats: one node {one_node['seconds']:.0f} s; two nodes with one killed at "
          f"{at_kill.rows} committed samples: {report['this_run']['elapsed_s']:.0f} s of job time; "
          f"{stderr.count('lost with its actor')} batch(es) run again by the driver, "
          f"{stderr.count('actor restarted after its worker died')} actor(s) restarted by Ray")


@pytest.mark.parametrize("settings, error", [
    ({"scheduling": "spread"}, "ray.scheduling must be one of ('DEFAULT', 'SPREAD')"),
    ({"capture_actors": 0}, "ray.capture_actors must be at least 1"),
])
def test_a_bad_spreading_setting_is_refused_naming_the_key(settings, error):
    with pytest.raises(JobConfigError, match=re.escape(error)):
        RayConfig(**settings)
