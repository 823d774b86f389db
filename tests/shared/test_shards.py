import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.manifest import MANIFEST_NAME, ManifestError, load_manifest
from shared.shards import Dataset, Sample, SampleError, ShardError, ShardWriter, shard_size, verify
from shared.synth import SynthConfig, synthetic_samples, write_synthetic

from small_fs import small_filesystem

SMALL = SynthConfig(samples=24, hidden_size=64, mean_tokens=48, max_tokens=200, vocab=1000,
                    shard_bytes=64 << 10)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "small"
    write_synthetic(out, SMALL)
    return out


def test_samples_read_back_bit_exact(small_ds):
    ds = Dataset(small_ds)
    originals = list(synthetic_samples(SMALL))
    assert len(ds) == len(originals) == SMALL.samples
    assert len(ds.manifest.shards) > 1, "the test data should span several shards"
    for i, original in enumerate(originals):
        got = ds[i]
        assert got["sample_id"] == original.sample_id
        assert got["source_index"] == original.source_index
        for name in ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"):
            assert torch.equal(got[name], getattr(original, name).to(got[name].dtype)), name
        assert got["finish_reason"] == "stop"


def test_manifest_totals_and_token_counts_match_the_samples(small_ds):
    m = load_manifest(small_ds)
    counts: dict[int, int] = {}
    tokens = 0
    for s in synthetic_samples(SMALL):
        tokens += len(s.input_ids)
        for t in s.input_ids[s.loss_mask.bool()].tolist():
            counts[t] = counts.get(t, 0) + 1
    assert m.rows == SMALL.samples and m.tokens == tokens
    assert m.token_counts == counts
    assert m.complete


def test_modality_metadata_round_trips(tmp_path):
    header = SMALL.header()
    s = next(synthetic_samples(SMALL))
    t = len(s.input_ids)
    s.position_ids = torch.arange(3 * t, dtype=torch.int32).view(3, t)
    s.modality_spans = [("image", 1, 3)]
    with ShardWriter(tmp_path, header) as w:
        w.add(s)
    got = Dataset(tmp_path)[0]
    assert torch.equal(got["position_ids"], s.position_ids)
    assert got["modality_spans"] == [("image", 1, 3)]


def test_sample_order_is_seeded_and_splits_ranks_and_workers_disjointly(small_ds):
    ds = Dataset(small_ds)
    a = ds.sample_order(seed=7, epoch=1)
    assert np.array_equal(a, ds.sample_order(seed=7, epoch=1))
    assert not np.array_equal(a, ds.sample_order(seed=7, epoch=2))
    assert not np.array_equal(a, ds.sample_order(seed=8, epoch=1))
    assert sorted(a.tolist()) == list(range(len(ds)))

    world, workers = 5, 2
    parts = [ds.sample_order(seed=7, epoch=1, rank=r, world_size=world, worker=w, num_workers=workers)
             for r in range(world) for w in range(workers)]
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())), "ranks and workers must not share samples"
    assert len(flat) == len(ds) - len(ds) % world
    per_rank = [sum(len(parts[r * workers + w]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1, "every rank must get the same number of samples"


def test_bad_sample_is_rejected_naming_the_sample_and_field(tmp_path):
    s = next(synthetic_samples(SMALL))
    s.aux_hidden_states = s.aux_hidden_states[:, :2]
    with ShardWriter(tmp_path, SMALL.header()) as w, pytest.raises(ValueError) as e:
        w.add(s)
    msg = str(e.value)
    assert s.sample_id in msg and "aux_hidden_states" in msg and "expected" in msg


def test_wrong_dtype_and_out_of_vocab_ids_are_rejected(tmp_path):
    w = ShardWriter(tmp_path, SMALL.header())
    s = next(synthetic_samples(SMALL))
    s.last_hidden_state = s.last_hidden_state.float()
    with pytest.raises(ValueError, match="last_hidden_state has dtype"):
        w.add(s)
    s = next(synthetic_samples(SMALL))
    s.input_ids = s.input_ids.clone()
    s.input_ids[0] = SMALL.vocab
    with pytest.raises(ValueError, match="input_ids holds ids outside"):
        w.add(s)


def test_a_refused_sample_leaves_the_open_shard_as_it_was(tmp_path):
    """The factory quarantines a sample the writer refuses and goes on writing the same shard."""
    first, bad, last = (s for _, s in zip(range(3), synthetic_samples(SMALL)))
    bad.loss_mask = bad.loss_mask.clone()
    bad.loss_mask[0] = 2
    with ShardWriter(tmp_path, SMALL.header()) as w:
        w.add(first)
        with pytest.raises(SampleError, match="loss_mask must hold only 0 and 1"):
            w.add(bad)
        w.add(last)
    assert verify(tmp_path).ok
    assert [Dataset(tmp_path)[i]["sample_id"] for i in range(2)] == [first.sample_id, last.sample_id]


def test_reopening_with_other_settings_is_refused(tmp_path):
    ShardWriter(tmp_path, SMALL.header()).close(complete=False)
    other = SynthConfig(samples=1, hidden_size=128, vocab=SMALL.vocab)
    with pytest.raises(ManifestError, match="hidden_size: 128 != 64"):
        ShardWriter(tmp_path, other.header())


# ------------------------------------------------------------------ corruption


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_caught_by_verify_naming_the_shard(small_ds, tmp_path):
    ds_dir = _copy(small_ds, tmp_path / "ds")
    victim = load_manifest(ds_dir).shards[1].file
    path = ds_dir / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(ds_dir)
    assert not report.ok
    assert len(report.errors) == 1 and victim in report.errors[0] and "sha256" in report.errors[0]


def test_truncated_shard_fails_on_read_naming_the_file(small_ds, tmp_path):
    ds_dir = _copy(small_ds, tmp_path / "ds")
    victim = load_manifest(ds_dir).shards[0].file
    with open(ds_dir / victim, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match=f"{victim}.*truncated"):
        Dataset(ds_dir)[0]


def test_shard_with_another_hidden_size_is_named_as_mismatched(small_ds, tmp_path):
    ds_dir = _copy(small_ds, tmp_path / "ds")
    other = tmp_path / "other"
    write_synthetic(other, SynthConfig(samples=2, hidden_size=32, vocab=SMALL.vocab))
    victim = load_manifest(ds_dir).shards[0]
    foreign = other / load_manifest(other).shards[0].file
    (ds_dir / victim.file).write_bytes(foreign.read_bytes())
    manifest = json.loads((ds_dir / MANIFEST_NAME).read_text())
    manifest["shards"][0]["bytes"] = foreign.stat().st_size  # pass the size check, fail the schema check
    (ds_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"{victim.file}: schema does not match.*hidden_size=b?'?32"):
        Dataset(ds_dir)[0]


def test_verify_cli_exits_nonzero_and_names_the_bad_shard(small_ds, tmp_path):
    ds_dir = _copy(small_ds, tmp_path / "ds")
    victim = load_manifest(ds_dir).shards[-1].file
    (ds_dir / victim).unlink()
    run = subprocess.run([sys.executable, "-m", "shared.cli", "shards", "verify", str(ds_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert victim in run.stderr and "missing" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "shared.cli", "shards", "verify", str(small_ds)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK:" in ok.stdout


# ------------------------------------------------------------------ kill and resume

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from shared.shards import ShardWriter
    from shared.synth import SynthConfig, synthetic_samples
    config = SynthConfig(**{config!r})
    writer = ShardWriter(sys.argv[1], config.header(), shard_bytes=config.shard_bytes)
    done = writer.done_ids()
    for sample in synthetic_samples(config):
        if sample.sample_id in done:
            continue
        writer.add(sample)
        print("added", sample.source_index, flush=True)
    writer.close()
    print("closed", flush=True)
    """
)


def _writer_process(directory: Path, config: SynthConfig) -> subprocess.Popen:
    fields = {k: getattr(config, k) for k in config.__slots__}
    script = WRITER_SCRIPT.format(config=fields)
    return subprocess.Popen([sys.executable, "-c", script, str(directory)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("kill_after", [3, 11, 17])
def test_writer_killed_mid_run_resumes_to_each_sample_exactly_once(tmp_path, kill_after):
    config = SynthConfig(samples=30, hidden_size=32, mean_tokens=40, max_tokens=100, vocab=500,
                         shard_bytes=32 << 10)
    reference = tmp_path / "reference"
    write_synthetic(reference, config)

    out = tmp_path / "killed"
    proc = _writer_process(out, config)
    for _ in range(kill_after):
        assert proc.stdout.readline().startswith("added")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What a reader sees now: only committed shards, all intact; nothing partial listed.
    killed = load_manifest(out)
    assert not killed.complete
    assert verify(out).ok
    assert killed.rows <= kill_after
    if killed.rows < kill_after:  # samples added but not committed sit in a temporary file
        assert any(p.name.endswith(".tmp") for p in out.iterdir())

    proc = _writer_process(out, config)
    assert proc.stdout.read().rstrip().endswith("closed")
    assert proc.wait() == 0
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert verify(out).ok

    resumed, expected = load_manifest(out), load_manifest(reference)
    ids = sorted(s["sample_id"] for s in Dataset(out))
    assert ids == sorted(s["sample_id"] for s in Dataset(reference))
    assert len(ids) == len(set(ids)) == config.samples
    assert resumed.token_counts == expected.token_counts
    assert resumed.tokens == expected.tokens and resumed.complete


def test_unlisted_shard_file_is_removed_on_reopen(tmp_path):
    w = ShardWriter(tmp_path, SMALL.header())
    w.add(next(synthetic_samples(SMALL)))
    w.commit()
    stray = tmp_path / "shard-00099.arrow"
    stray.write_bytes(b"half a shard")
    ShardWriter(tmp_path, SMALL.header())
    assert not stray.exists()
    assert len(Dataset(tmp_path)) == 1


def test_loader_workers_read_the_same_bytes_after_fork(small_ds):
    ds = Dataset(small_ds)
    expected = [ds[i]["aux_hidden_states"].float().sum().item() for i in range(4)]  # opens maps pre-fork
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, sampler=range(4), multiprocessing_context="fork",
        collate_fn=lambda s: s["aux_hidden_states"].float().sum().item(),
    )
    assert list(loader) == expected
    assert ds[3]["aux_hidden_states"].float().sum().item() == expected[3]


def test_tensors_are_views_of_the_map_and_writes_never_reach_the_file(small_ds):
    ds = Dataset(small_ds)
    a, b = ds[0]["aux_hidden_states"], ds[0]["aux_hidden_states"]
    assert a.data_ptr() == b.data_ptr(), "two reads of one sample should view the same mapped bytes"
    before = a.float().sum().item()
    a.add_(1)  # a caller's in-place op: private to this process
    assert Dataset(small_ds)[0]["aux_hidden_states"].float().sum().item() == before
    assert verify(small_ds).ok


def test_the_size_model_bounds_the_shards_written_within_a_hundred_bytes_a_sample(tmp_path):
    """`shard_size` reads the encoding off the schema (bf16: three aux layers and the last hidden
    state, 2 bytes a value, plus an int32 id and a uint8 mask a token) and never says less than
    the writer writes."""
    m = write_synthetic(tmp_path, SMALL)
    size = shard_size(SMALL.header())
    assert size.per_token == 4 * SMALL.hidden_size * 2 + 4 + 1
    bound = size.bytes(tokens=m.tokens, samples=m.rows, shards=len(m.shards))
    written = sum(s.bytes for s in m.shards)
    assert written <= bound <= written + 100 * m.rows


def test_a_full_disk_leaves_no_partial_shard_and_the_reopened_writer_adds_each_sample_once(tmp_path):
    samples = list(synthetic_samples(SMALL))
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(shutil.disk_usage(disk).free - (256 << 10)))  # room for about a third
        out = disk / "ds"
        writer = ShardWriter(out, SMALL.header(), shard_bytes=SMALL.shard_bytes)
        with pytest.raises(OSError) as full:
            for s in samples:
                writer.add(s)
        assert full.value.errno == errno.ENOSPC
        writer.abort()
        listed = load_manifest(out).shards
        assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, *(s.file for s in listed)])  # no temporary file
        assert verify(out).ok and 0 < sum(s.rows for s in listed) < len(samples)

        ballast.unlink()
        writer = ShardWriter(out, SMALL.header(), shard_bytes=SMALL.shard_bytes)
        done = writer.done_ids()
        for s in samples:
            if s.sample_id not in done:
                writer.add(s)
        writer.close()
        assert verify(out).ok
        ds = Dataset(out)
        assert sorted(ds[i]["sample_id"] for i in range(len(ds))) == sorted(s.sample_id for s in samples)
