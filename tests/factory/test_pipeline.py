"""Factory jobs end to end: job files, exactly-once output, and resumption after a SIGKILLed
driver or a killed Ray worker. Jobs run as `specmill factory run` subprocesses, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from factory.default_model import DefaultModelConfig, prepare_default
from factory.job import JobConfigError, load_job
from factory.prompts import write_chitchat_prompts
from factory.vllm_server import VllmServer, VllmServerConfig
from shared.manifest import load_manifest
from shared.shards import Dataset

from dataset_contents import read_back
from poison_rows import bomb_chat, bomb_png, deeply_nested_line, lone_surrogate_line
from processes import kill_tree, leftovers, marked, run_tree, start_tree

N_CHATS = 40


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return prepare_default(DefaultModelConfig(engine_check=False))


# --------------------------------------------------------------------------- job files


def test_a_job_file_resolves_paths_beside_it_and_flags_override_it(tmp_path, smollm_dir):
    (tmp_path / "jobs").mkdir()
    job_file = tmp_path / "jobs" / "job.toml"
    job_file.write_text(f'model = "{smollm_dir}"\n[input]\npaths = ["data/p.jsonl"]\n[output]\ndir = "out"\n'
                        f'[sampling]\nmax_tokens = 64\ntemperatures = [0.0, 1]\n[ray]\nnum_cpus = 2\n')
    job = load_job(job_file)
    assert job.input.paths == (tmp_path / "jobs" / "data" / "p.jsonl",)
    assert job.output.dir == tmp_path / "jobs" / "out"
    assert job.sampling.max_tokens == 64 and job.sampling.temperatures == (0.0, 1.0)
    job = load_job(job_file, {"sampling.max_tokens": 8, "output.dir": tmp_path / "elsewhere", "ray.num_cpus": None})
    assert job.sampling.max_tokens == 8 and job.output.dir == tmp_path / "elsewhere" and job.ray.num_cpus == 2


@pytest.mark.parametrize("toml, error", [
    ('[sampling]\nmax_token = 3\n', "unknown key(s) sampling.max_token; sampling takes"),
    ('[sampling]\ntop_p = "high"\n', "sampling.top_p must be a number"),
    ('[sampling]\ntemperatures = [-1]\n', "sampling.temperatures must be a non-empty list of numbers >= 0"),
    ('[render]\noverlong = "wrap"\n', "render: overlong must be one of"),
    ('[servers]\nurls = ["localhost:8000"]\n', "servers.urls entries must be http(s) base URLs"),
    ('[servers]\nvllm_args = ["--port", "1"]\n', "servers.vllm_args must not contain --port"),
    ('[capture]\ndevice = "cuda"\n', "capture.num_gpus is 0"),
    ('[ray]\naddress = "auto"\nnum_cpus = 2\n', "leave them out with ray.address"),
    ('[input]\nformat = "prompt"\n', "needs input.prompt_column"),
    ('[sampling]\nthinking = true\n[render]\nchat_template_kwargs = {enable_thinking = false}\n', "contradicts"),
])
def test_a_bad_job_file_is_refused_naming_the_key(tmp_path, smollm_dir, toml, error):
    base = f'model = "{smollm_dir}"\n[output]\ndir = "out"\n'
    if "[input]" not in toml:
        base += '[input]\npaths = ["p.jsonl"]\n'
    else:
        toml = toml.replace("[input]\n", '[input]\npaths = ["p.jsonl"]\n')
    (tmp_path / "job.toml").write_text(base + toml)
    with pytest.raises(JobConfigError) as e:
        load_job(tmp_path / "job.toml")
    assert error in str(e.value)


def test_capture_runs_on_vllm_by_default_for_a_text_target_and_on_transformers_for_a_vlm(tmp_path, smollm_dir):
    from tiny_models import build_tiny_qwen2_vl

    from factory.pipeline import choose_capture_backend

    job = load_job(None, {"model": smollm_dir, "input.paths": ["x"], "output.dir": tmp_path / "out"})
    chosen = choose_capture_backend(job)
    assert job.capture.backend == "auto" and chosen.name == "vllm" and chosen.reason.startswith("auto: ")
    assert chosen.compute_dtype in ("float32", "bfloat16")  # capture.dtype auto, resolved for this machine
    flags = {"model": smollm_dir, "input.paths": ["x"], "output.dir": tmp_path / "out",
             "capture.backend": "transformers"}
    assert choose_capture_backend(load_job(None, flags)).name == "transformers"
    vlm = build_tiny_qwen2_vl(tmp_path / "vl", tokenizer_dir=smollm_dir)
    chosen = choose_capture_backend(load_job(None, {**flags, "model": vlm, "capture.backend": "auto"}))
    assert chosen.name == "transformers" and "qwen2_vl target (with image input)" in chosen.reason
    with pytest.raises(JobConfigError, match="capture.backend = vllm, but .* text targets only"):
        choose_capture_backend(load_job(None, {**flags, "model": vlm, "capture.backend": "vllm"}))


def test_the_vllm_capture_servers_take_the_jobs_engine_flags(tmp_path, smollm_dir):
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'model = "{smollm_dir}"\n[input]\npaths = ["p.jsonl"]\n[output]\ndir = "out"\n'
                        f'[render]\nmax_length = 1024\n[capture]\nbackend = "vllm"\n'
                        f'vllm_args = ["--tensor-parallel-size", "1"]\n'
                        f'vllm_env = {{VLLM_CPU_OMP_THREADS_BIND = "all"}}\n')
    config = load_job(job_file).capture.vllm_capture_config(load_job(job_file).render)
    assert config.extra_args == ("--tensor-parallel-size", "1") and config.max_length == 1024
    assert config.env == {"VLLM_CPU_OMP_THREADS_BIND": "all"}
    with pytest.raises(JobConfigError, match="capture.backend must be one of"):
        load_job(job_file, {"capture.backend": "sglang"})
    with pytest.raises(JobConfigError, match="capture: extra_args must not set"):
        job = load_job(job_file, {"capture.vllm_args": ["--dtype", "half"]})
        job.capture.vllm_capture_config(job.render)


def test_an_object_store_output_is_refused_instead_of_written_to_a_mangled_path(tmp_path, smollm_dir):
    with pytest.raises(JobConfigError, match="object-store output is not supported yet"):
        load_job(None, {"model": smollm_dir, "input.paths": ["x"], "output.dir": "s3://bucket/data"})


def test_a_job_without_model_or_prompts_names_the_flag(tmp_path):
    with pytest.raises(JobConfigError, match="needs `model` \\(flag --model\\)"):
        load_job(None, {"input.paths": ["x"], "output.dir": tmp_path})


# --------------------------------------------------------------------------- helpers


def prompts_file(directory: Path) -> Path:
    """Real chats (some with only a user turn: nothing to keep in keep-original mode), a line
    that is not JSON, a row of another shape, a duplicate chat, and a ShareGPT Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    chats = write_chitchat_prompts(directory / "a-chitchat.jsonl", N_CHATS)
    lines = chats.read_text().splitlines()
    lines[5:5] = ["{broken json", json.dumps({"text": "no chat here"}), lines[0]]
    chats.write_text("\n".join(lines) + "\n")
    sharegpt = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]}
                for i in range(4)]
    pq.write_table(pa.Table.from_pylist(sharegpt), directory / "b-sharegpt.parquet")
    return directory


def write_job(path: Path, model: Path, prompts: Path, out: Path, **sections: dict) -> Path:
    """A small job file. Capture runs on transformers unless `capture={"backend": "vllm"}` is given:
    the vllm backend starts a capture server per job (about a minute), for its own tests only."""
    tables = {"input": {"paths": [str(prompts)]}, "output": {"dir": str(out), "commit_every": 4},
              "capture": {"backend": "transformers"},
              "ray": {"num_cpus": 2, "batch_size": 4, "capture_batch": 4, "max_in_flight": 8}}
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    text = f'model = "{model}"\n'
    for name, values in tables.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path.write_text(text)
    return path


def specmill(*args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


def run_job(job: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = run_tree(specmill("factory", "run", str(job), "--no-progress", *extra), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_when(job: Path, out: Path, ready, *, timeout: float = 240) -> None:
    """Start the job as a subprocess and SIGKILL its process group (driver, its local Ray and
    workers) as soon as `ready(manifest)` holds."""
    proc = start_tree(specmill("factory", "run", str(job), "--no-progress"), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.json").exists() and ready(load_manifest(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        kill_tree(proc)


def contents(out: Path) -> dict:
    """What a finished data set holds, in a form two runs can be compared by."""
    manifest, samples, quarantine = read_back(out)
    return {
        "sample_ids": sorted(s["sample_id"] for s in samples),
        "source_indices": sorted(s["source_index"] for s in samples),
        "quarantine": sorted((q["index"], q["stage"], q["reason"]) for q in quarantine),
        "token_counts": manifest.token_counts,
        "tokens": manifest.tokens,
    }


def assert_each_row_exactly_once(c: dict, rows: int) -> None:
    seen = Counter(c["source_indices"]) + Counter(i for i, _, _ in c["quarantine"])
    assert sorted(seen) == list(range(rows)), "gaps or extra rows"
    assert set(seen.values()) == {1}, f"duplicates: {[i for i, n in seen.items() if n > 1]}"
    assert len(set(c["sample_ids"])) == len(c["sample_ids"])


# --------------------------------------------------------------------------- keep-original jobs (no vLLM)


@pytest.fixture(scope="module")
def original_inputs(tmp_path_factory) -> Path:
    return prompts_file(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm_dir, original_inputs) -> dict:
    """An uninterrupted keep-original-answers run: what every interrupted run must end up as."""
    work = tmp_path_factory.mktemp("reference")
    job = write_job(work / "job.toml", smollm_dir, original_inputs, work / "out",
                    sampling={"keep_original_answers": True})
    done = run_job(job)
    report = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    return {"contents": contents(work / "out"), "report": report, "out": work / "out", "job": job}


def test_every_input_row_ends_once_in_the_shards_or_the_quarantine_with_its_reason(reference):
    c, report = reference["contents"], reference["report"]
    rows = N_CHATS + 3 + 4
    assert_each_row_exactly_once(c, rows)
    reasons = {i: (stage, reason) for i, stage, reason in c["quarantine"]}
    assert reasons[5][0] == "read" and "not valid JSON" in reasons[5][1]
    assert reasons[6][0] == "read" and "none of the fields" in reasons[6][1]
    assert reasons[7][0] == "read" and "duplicate of" in reasons[7][1] and "a-chitchat.jsonl:0" in reasons[7][1]
    assert any(stage == "render" and "no assistant turn" in reason for stage, reason in reasons.values())
    assert set(range(rows - 4, rows)) <= set(c["source_indices"])  # the ShareGPT rows
    assert report["samples"] == len(c["sample_ids"]) and report["quarantined"] == len(c["quarantine"])
    assert report["quarantined_by_stage"]["read"] == 3
    progress = json.loads((reference["out"] / "progress.json").read_text())
    assert progress["done"] == progress["total"] == rows and progress["eta_s"] == 0.0
    assert set(progress["stages"]) == {"read", "resample", "capture", "write", "quarantine"}


def test_running_a_finished_job_again_changes_nothing(reference):
    before = (reference["out"] / "manifest.json").read_bytes()
    done = run_job(reference["job"])
    assert (reference["out"] / "manifest.json").read_bytes() == before
    assert json.loads(done.stdout[:done.stdout.rindex("}") + 1]) == reference["report"]


def test_a_finished_job_whose_inputs_grew_takes_the_new_rows(tmp_path, smollm_dir, original_inputs):
    """Rows appended to a finished job's input are not ignored as "already complete": the data
    set is reopened, the new rows are added once, and it ends as a straight run would."""
    full = (original_inputs / "a-chitchat.jsonl").read_text().splitlines(keepends=True)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a-chitchat.jsonl").write_text("".join(full[:12]))  # with the broken, odd and duplicate rows
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", smollm_dir, inputs, out, sampling={"keep_original_answers": True})
    run_job(job)
    assert load_manifest(out).info["report"]["input_rows"] == 12

    (inputs / "a-chitchat.jsonl").write_text("".join(full))
    done = run_job(job)
    assert "reopening it for the new rows" in done.stderr
    grown = contents(out)
    assert load_manifest(out).info["report"]["input_rows"] == len(full)
    assert_each_row_exactly_once(grown, len(full))

    straight = tmp_path / "straight"
    run_job(write_job(tmp_path / "straight.toml", smollm_dir, inputs, straight,
                      sampling={"keep_original_answers": True}))
    assert grown == contents(straight)


def test_rows_that_once_stopped_every_run_of_a_job_are_quarantined_with_their_reason(tmp_path, smollm_dir):
    """A line nested 5,000 deep (RecursionError in the reader), an image that declares 60,000 x
    60,000 pixels (PIL's DecompressionBombError in the resample stage) and a lone surrogate (the
    tokenizer's TypeError) each stopped the whole job, on the same row at every restart."""
    chats = [json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                      {"role": "assistant", "content": f"{i}."}]}) for i in range(4)]
    lines = [chats[0], deeply_nested_line(), chats[1], json.dumps(bomb_chat()), chats[2], lone_surrogate_line(),
             chats[3]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = run_job(write_job(tmp_path / "job.toml", smollm_dir, tmp_path / "in", out,
                               sampling={"keep_original_answers": True})).stdout
    assert '"quarantined": 3' in report
    _, samples, quarantine = read_back(out)
    assert sorted(s["source_index"] for s in samples) == [0, 2, 4, 6]
    records = {(Path(q["file"]).name, q["row"]): (q["stage"], q["reason"]) for q in quarantine}
    assert set(records) == {("p.jsonl", 1), ("p.jsonl", 3), ("p.jsonl", 5)}
    assert records["p.jsonl", 1] == ("read", "not usable JSON: nested too deeply to parse (arrays or objects "
                                             "inside each other)")
    stage, reason = records["p.jsonl", 3]
    assert stage == "render" and reason.startswith("field messages[0].content[1].image_url.url: the image declares "
                                                   "more pixels than this factory decodes (Image size (3600000000")
    stage, reason = records["p.jsonl", 5]
    assert stage == "render" and reason.startswith("the render stage raised TypeError: ")


def test_factory_run_reads_image_files_as_the_users_own_wherever_they_are(tmp_path, smollm_dir):
    """No service roots confine `factory run`: an image file in a directory of its own is read
    and captured. The same file made a decompression bomb is refused where the renderer opens it."""
    from PIL import Image

    from tiny_models import build_tiny_qwen2_vl

    vlm = build_tiny_qwen2_vl(tmp_path / "tiny-vl", tokenizer_dir=smollm_dir)
    pictures = tmp_path / "my-pictures"
    pictures.mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(pictures / "red.png")
    (pictures / "bomb.png").write_bytes(bomb_png())
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(pictures / name)}},
                                                       {"type": "text", "text": "What colour?"}]},
                          {"role": "assistant", "content": "Red."}]} for name in ("red.png", "bomb.png")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    # The default backend: a VLM target is captured by transformers, and the manifest says why.
    run_job(write_job(tmp_path / "job.toml", vlm, tmp_path / "in", out, sampling={"keep_original_answers": True},
                      capture={"backend": "auto"}))
    capture = load_manifest(out).info["capture"]
    assert capture["backend"] == "transformers" and "vLLM capture takes text targets only" in capture["reason"]
    _, [sample], [record] = read_back(out)
    assert sample["source_index"] == 0 and [kind for kind, _, _ in sample["modality_spans"]] == ["image"]
    assert (record["row"], record["stage"]) == (1, "render")
    assert record["reason"].startswith("field messages[0].content[0].image: the image declares more pixels than this "
                                       "factory decodes")


# Both capture backends pass the kill tests. The vllm backend starts a capture server per run (and
# another after each kill): minutes on 2 cores, so its cases are slow.
BACKENDS = ["transformers", pytest.param("vllm", marks=pytest.mark.slow)]
CAPTURE_ACTOR = {"transformers": "_CaptureActor", "vllm": "_VllmCaptureActor"}
SECONDS = {"transformers": 300, "vllm": 900}  # per run, server starts included


def keep_original_job(tmp_path: Path, model: Path, inputs: Path, backend: str) -> tuple[Path, Path]:
    out = tmp_path / "out"
    return write_job(tmp_path / "job.toml", model, inputs, out, sampling={"keep_original_answers": True},
                     capture={"backend": backend}), out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_driver_killed_mid_run_resumes_to_the_uninterrupted_data_set(tmp_path, smollm_dir, original_inputs,
                                                                       reference, backend):
    """The reference ran on transformers: ids, token ids, masks and counts do not depend on the backend."""
    job, out = keep_original_job(tmp_path, smollm_dir, original_inputs, backend)
    kill_when(job, out, lambda m: len(m.shards) >= 1, timeout=SECONDS[backend])  # mid-run: some shards committed
    first = load_manifest(out)
    assert not first.complete and 0 < first.rows < len(reference["contents"]["sample_ids"])
    kill_when(job, out, lambda m: m.rows > first.rows, timeout=SECONDS[backend])  # killed again after resuming
    assert not load_manifest(out).complete
    run_job(job, timeout=SECONDS[backend])
    assert contents(out) == reference["contents"]
    assert load_manifest(out).info["capture"]["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_capture_worker_is_restarted_and_the_job_completes_exactly_once(tmp_path, smollm_dir,
                                                                                  original_inputs, reference, backend):
    job, out = keep_original_job(tmp_path, smollm_dir, original_inputs, backend)
    proc = start_tree(specmill("factory", "run", str(job), "--no-progress"), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_worker_when(proc, out, CAPTURE_ACTOR[backend], lambda m: len(m.shards) >= 1,
                                   timeout=SECONDS[backend])
        stdout, stderr = proc.communicate(timeout=SECONDS[backend])
        # The killed actor's capture server died with it (its reaper), the restarted one with the job.
        servers_left = [cmd for cmd in leftovers(proc) if "api_server" in cmd]
    finally:
        kill_tree(proc)
    assert killed and proc.returncode == 0, stderr[-3000:]
    assert not servers_left, servers_left
    assert "capture actor restarted after its worker died" in stderr
    assert contents(out) == reference["contents"]


@pytest.mark.slow  # a vLLM capture server started twice
def test_a_killed_capture_server_is_restarted_and_the_job_completes_exactly_once(tmp_path, smollm_dir,
                                                                                 original_inputs, reference):
    job, out = keep_original_job(tmp_path, smollm_dir, original_inputs, "vllm")
    proc = start_tree(specmill("factory", "run", str(job), "--no-progress"), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_capture_server_when(proc, out, lambda m: len(m.shards) >= 1, timeout=SECONDS["vllm"])
        stdout, stderr = proc.communicate(timeout=SECONDS["vllm"])
        servers_left = [cmd for cmd in leftovers(proc) if "api_server" in cmd]
    finally:
        kill_tree(proc)
    assert killed and proc.returncode == 0, stderr[-3000:]
    assert not servers_left, servers_left
    assert "the vLLM capture server is not answering; restarting it" in stderr
    assert contents(out) == reference["contents"]


def _kill_capture_server_when(proc: subprocess.Popen, out: Path, ready, timeout: float) -> bool:
    """SIGKILL the process group of the job's vLLM capture server (API server, engine core, workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists() and ready(load_manifest(out)):
            for p in marked(proc.tree_marker):
                try:
                    cmdline = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if "api_server" in cmdline and "extract_hidden_states" in cmdline:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the group is the server's alone
                    return True
        time.sleep(0.05)
    return False


def _kill_worker_when(proc: subprocess.Popen, out: Path, actor: str, ready, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists() and ready(load_manifest(out)):
            # Only this job's worker: Ray's workers stay in the driver's session, and other
            # Ray clusters on the machine (other tests, other users) have actors of the same name.
            for p in psutil.process_iter(["cmdline"]):
                try:
                    ours = os.getsid(p.pid) == proc.pid
                except (ProcessLookupError, PermissionError):
                    continue
                if ours and any(f"ray::{actor}" in part for part in (p.info["cmdline"] or [])):
                    p.send_signal(signal.SIGKILL)
                    return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # three `factory run`s (two with Ray) on a tiny target: about a minute on 2 cores
def test_a_job_that_fills_its_disk_stops_clearly_and_resumes_exactly_once_after_space_is_freed(
        tmp_path, smollm_dir, original_inputs):
    """A 4 MiB tmpfs with a ballast file leaving room for about half the data set: the job is refused
    up front naming the numbers; forced, it runs out of space mid-run and stops with a clear error,
    no partial shard listed or left behind; with the ballast gone it resumes to every row exactly once."""
    from factory.inputs import MediaPaths
    from factory.plan import plan_job
    from shared.shards import verify
    from tiny_models import build_tiny_causal_lm

    from small_fs import small_filesystem

    tiny = build_tiny_causal_lm("llama", tmp_path / "tiny", tokenizer_dir=smollm_dir)
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        job = write_job(tmp_path / "job.toml", tiny, original_inputs, out, sampling={"keep_original_answers": True})
        plan = plan_job(load_job(job), media=MediaPaths())
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(shutil.disk_usage(disk).free - plan.total_bytes // 2))
        free = shutil.disk_usage(disk).free

        refused = run_tree(specmill("factory", "run", str(job), "--no-progress"), timeout=300)
        assert refused.returncode == 1 and "error: the job's data set does not fit" in refused.stderr
        assert f"needs {plan.needed_bytes:,} bytes" in refused.stderr and f"has {free:,} bytes" in refused.stderr
        assert not out.exists()

        full = run_tree(specmill("factory", "run", str(job), "--no-progress", "--ignore-free-space"), timeout=300)
        assert full.returncode == 1, full.stderr[-3000:]
        assert f"error: the disk holding {out} is full" in full.stderr and "no partial shard is listed" in full.stderr
        assert "Traceback" not in full.stderr
        stopped = load_manifest(out)
        assert not stopped.complete and 0 < stopped.rows < plan.samples
        assert verify(out).ok  # every listed shard whole
        assert {p.name for p in out.iterdir() if p.suffix == ".arrow" or p.name.endswith(".tmp")} == \
            {s.file for s in stopped.shards}

        ballast.unlink()
        resumed = run_job(job)
        assert "reopening" not in resumed.stderr
        c = contents(out)
        assert_each_row_exactly_once(c, N_CHATS + 3 + 4)
        assert c["tokens"] == plan.tokens and len(c["sample_ids"]) == plan.samples
        assert sum(s.bytes for s in load_manifest(out).shards) <= plan.data_bytes


@pytest.fixture(scope="module")
def vllm_reference(tmp_path_factory, smollm_dir, original_inputs) -> dict:
    """An uninterrupted keep-original-answers run from flags alone: capture on the default backend."""
    out = tmp_path_factory.mktemp("vllm-reference") / "out"
    done = run_tree(specmill("factory", "run", "--model", str(smollm_dir), "--prompts", str(original_inputs),
                             "--out", str(out), "--keep-original-answers", "--num-cpus", "2", "--no-progress"),
                    timeout=SECONDS["vllm"])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"contents": contents(out), "out": out, "report": json.loads(done.stdout[:done.stdout.rindex("}") + 1])}


@pytest.mark.slow  # a vLLM capture server
def test_a_job_captured_on_vllm_equals_the_same_job_on_transformers_within_bf16_tolerance(reference, vllm_reference):
    """Same samples (ids, token ids, masks) and hidden states that differ by bf16 storage rounding only."""
    assert vllm_reference["contents"] == reference["contents"]
    vllm_info, hf_info = (load_manifest(r["out"]).info["capture"] for r in (vllm_reference, reference))
    assert vllm_info["backend"] == "vllm" and hf_info["backend"] == "transformers"
    assert vllm_info["compute_dtype"] == hf_info["compute_dtype"]
    _, got, _ = read_back(vllm_reference["out"])
    _, expected, _ = read_back(reference["out"])
    expected_by_id = {s["sample_id"]: s for s in expected}
    errors = []
    for s in got:
        e = expected_by_id[s["sample_id"]]
        assert torch.equal(s["input_ids"], e["input_ids"]) and torch.equal(s["loss_mask"], e["loss_mask"])
        for key in ("aux_hidden_states", "last_hidden_state"):
            assert s[key].shape == e[key].shape and s[key].dtype == e[key].dtype == torch.bfloat16
            errors.append((key, per_token_rel_error(s[key], e[key])))
    aux = torch.cat([err for key, err in errors if key == "aux_hidden_states"])
    last = torch.cat([err for key, err in errors if key == "last_hidden_state"])
    figures = {"aux_max": aux.max().item(), "aux_mean": aux.mean().item(), "last_max": last.max().item(),
               "last_mean": last.mean().item()}
    print(f"vLLM vs transformers job, per-token relative error: {figures}")
    limit = BF16_TOLERANCE[vllm_info["compute_dtype"]]
    assert all(figures[k] <= limit[k] for k in limit), (figures, limit)


# Per-token relative error ||x - y|| / ||y|| between two backends' stored (bf16) states. A float32
# forward on both sides leaves bf16 storage rounding (2^-9 relative per element; the norm over 576
# channels averages it) plus float32 noise. A bfloat16 forward leaves bf16 arithmetic on both
# sides: measured up to 0.10 (aux) from float32 for transformers, up to 0.125 for vLLM
# (docs/design.md, "vLLM capture numerics").
BF16_TOLERANCE = {"float32": {"aux_max": 0.01, "aux_mean": 0.004, "last_max": 0.01, "last_mean": 0.004},
                  "bfloat16": {"aux_max": 0.25, "aux_mean": 0.03, "last_max": 0.15, "last_mean": 0.03}}


def per_token_rel_error(x, y):
    x, y = x.float(), y.float()
    return ((x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-6)).flatten()


@pytest.mark.slow  # a vLLM capture server
def test_a_flags_only_job_captures_on_vllm_and_its_shards_equal_a_transformers_forward(vllm_reference, smollm_dir):
    from factory.capture import CaptureConfig, CaptureStage
    from factory.render import RenderedRow
    from factory.targets import HFTarget, TargetConfig

    capture = load_manifest(vllm_reference["out"]).info["capture"]
    assert capture["backend"] == "vllm" and capture["reason"].startswith("auto: "), capture
    assert vllm_reference["report"]["capture_backend"] == "vllm"
    ds = Dataset(vllm_reference["out"])
    samples = [ds[i] for i in range(len(ds))]
    rows = [RenderedRow(sample_id=s["sample_id"], source_index=s["source_index"], input_ids=s["input_ids"].long(),
                        loss_mask=s["loss_mask"]) for s in samples]
    stage = CaptureStage(HFTarget(TargetConfig(model=smollm_dir, dtype="auto")), CaptureConfig())
    assert stage.header == load_manifest(vllm_reference["out"]).header
    aux, last = [], []
    for s, (hf_aux, hf_last, _) in zip(samples, stage.hidden_states(rows), strict=True):
        aux.append(per_token_rel_error(s["aux_hidden_states"], hf_aux.to(torch.bfloat16)))
        last.append(per_token_rel_error(s["last_hidden_state"], hf_last.to(torch.bfloat16)))
    aux, last = torch.cat(aux), torch.cat(last)
    figures = {"aux_max": aux.max().item(), "aux_mean": aux.mean().item(), "last_max": last.max().item(),
               "last_mean": last.mean().item()}
    print(f"flags-only job (vLLM) vs an independent transformers forward: {figures}")
    limit = BF16_TOLERANCE[capture["compute_dtype"]]
    assert all(figures[k] <= limit[k] for k in limit), (figures, limit)


# --------------------------------------------------------------------------- resampling jobs (real vLLM)


@pytest.fixture(scope="module")
def vllm_url(smollm_dir):
    config = VllmServerConfig(model=smollm_dir, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                              extra_args=("--enforce-eager", "--no-enable-chunked-prefill", "--max-model-len", "2048"))
    with VllmServer(config) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def resampled(tmp_path_factory, smollm_dir, vllm_url) -> dict:
    """An uninterrupted greedy resampling run from flags alone, as the README shows it."""
    work = tmp_path_factory.mktemp("resampled")
    inputs = write_chitchat_prompts(work / "prompts.jsonl", 16)
    started = time.monotonic()
    done = run_tree(specmill("factory", "run", "--model", str(smollm_dir), "--prompts", str(inputs),
                                   "--out", str(work / "out"), "--max-samples", "16", "--max-tokens", "24",
                                   "--temperatures", "0", "--server-url", vllm_url, "--num-cpus", "2",
                                   "--capture-backend", "transformers", "--no-progress"),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": work / "out", "inputs": inputs, "seconds": time.monotonic() - started,
            "report": json.loads(done.stdout[:done.stdout.rindex("}") + 1])}


@pytest.mark.slow
def test_a_resampling_job_from_flags_writes_the_targets_own_answers(resampled, smollm_dir):
    c = contents(resampled["out"])
    assert_each_row_exactly_once(c, 16)
    assert len(c["sample_ids"]) == 16 and not c["quarantine"]  # every chat gets answers, user-only ones too
    report = resampled["report"]
    stages = report["this_run"]["stages"]
    assert stages["resample"]["generated_tokens"] == report["loss_tokens"] > 0
    assert set(report["this_run"]["finish_reasons"]) <= {"stop", "length"}
    ds = Dataset(resampled["out"])
    original = [json.loads(line)["messages"] for line in resampled["inputs"].read_text().splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    for i in range(len(ds)):
        s = ds[i]
        text = tok.decode(s["input_ids"].tolist())
        source = original[s["source_index"]]
        assert all(m["content"] in text for m in source if m["role"] == "user")
        assert s["temperature"] == 0.0 and s["finish_reason"] in ("stop", "length")
    print(f"16 samples resampled and captured in {resampled['seconds']:.0f} s (incl. Ray start)")



@pytest.mark.slow
def test_a_killed_resampling_job_resumes_with_each_sample_exactly_once(tmp_path, smollm_dir, vllm_url, resampled):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", smollm_dir, resampled["inputs"], out,
                    sampling={"max_tokens": 24, "temperatures": [0.0]}, servers={"urls": [vllm_url]},
                    input={"max_samples": 16})
    kill_when(job, out, lambda m: len(m.shards) >= 1)
    assert not load_manifest(out).complete
    run_job(job)
    resumed, reference = contents(out), contents(resampled["out"])
    assert_each_row_exactly_once(resumed, 16)
    assert resumed["sample_ids"] == reference["sample_ids"]  # same ids: same chats, same settings
    # Token counts are compared, not asserted: greedy answers can differ in a token when a
    # request shares its forward pass with other requests (see README, "Determinism").
    same = resumed["token_counts"] == reference["token_counts"]
    print(f"resumed greedy run: token counts {'equal' if same else 'DIFFER'} to the uninterrupted run's")


def test_thinking_mode_is_refused_for_a_template_without_one(tmp_path, smollm_dir, original_inputs):
    job = write_job(tmp_path / "job.toml", smollm_dir, original_inputs, tmp_path / "out", sampling={"thinking": True})
    done = run_tree(specmill("factory", "run", str(job)), timeout=120)
    assert done.returncode == 2 and "has no thinking switch (enable_thinking)" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_job_whose_vllm_server_cannot_start_fails_naming_the_cause(default_model_dir, tmp_path):
    """No endless wait: the server exits at once (a flag vLLM does not know), and `factory run`
    stops with exit 1 and vLLM's own complaint, not a hang or a traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    job = tmp_path / "job.toml"
    job.write_text('[servers]\nvllm_args = ["--no-such-vllm-flag"]\n')
    proc = run_tree([sys.executable, "-m", "shared.cli", "factory", "run", str(job), "--model",
                           str(default_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                           "--capture-backend", "transformers", "--no-progress"], timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the job's vLLM server could not start" in proc.stderr
    assert "--no-such-vllm-flag" in proc.stderr  # vLLM's own words, from its log
