"""Shard data sets on a filesystem URI: a real S3 protocol server (moto) and file://."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from shared.manifest import load_manifest
from shared.shards import Dataset, ShardError, verify
from shared.storage import Location
from shared.synth import SynthConfig, write_synthetic

CONFIG = SynthConfig(samples=16, hidden_size=64, mean_tokens=48, max_tokens=200, vocab=1000,
                     shard_bytes=64 << 10)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A local S3 server; yields a function that names a fresh s3:// data set URI."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://specmill?{query}&allow_bucket_creation=true")
    fs.create_dir("specmill")
    names = iter(range(10**6))
    try:
        yield lambda: f"s3://specmill/ds{next(names)}?{query}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "ds"
    write_synthetic(out, CONFIG)
    return out


def _same_dataset(uri: str, reference: Path) -> None:
    got, want = Dataset(uri), Dataset(reference)
    assert len(got) == len(want) == CONFIG.samples
    # The writer is the same code either way: the shards are byte-identical.
    assert [s.sha256 for s in got.manifest.shards] == [s.sha256 for s in want.manifest.shards]
    assert got.manifest.token_counts == want.manifest.token_counts and got.manifest.complete
    order = want.sample_order(seed=3)
    assert len(order) == CONFIG.samples > 0
    for i, streamed in zip(order, got.stream(order), strict=True):
        for sample in (got[int(i)], streamed):
            expected = want[int(i)]
            for key, value in expected.items():
                same = torch.equal(value, sample[key]) if isinstance(value, torch.Tensor) else value == sample[key]
                assert same, (int(i), key)
    assert got.lengths().tolist() == want.lengths().tolist()


def test_data_set_on_s3_reads_back_what_a_local_write_holds(s3, local_reference):
    uri = s3()
    write_synthetic(uri, CONFIG)
    assert not Location.parse(uri).is_local
    _same_dataset(uri, local_reference)
    report = verify(uri)
    assert report.ok, report.errors
    assert report.samples == CONFIG.samples


def test_file_uri_reads_and_writes_through_the_local_fast_path(tmp_path, local_reference):
    uri = f"file://{tmp_path}/ds"
    write_synthetic(uri, CONFIG)
    ds = Dataset(uri)
    assert ds.location.is_local and ds.location.local == tmp_path / "ds"
    _same_dataset(uri, local_reference)
    assert verify(uri).ok


def test_corrupt_object_on_s3_is_named_by_verify(s3):
    uri = s3()
    write_synthetic(uri, CONFIG)
    where = Location.parse(uri)
    victim = load_manifest(uri).shards[1].file
    data = bytearray(where.read_bytes(victim))
    data[len(data) // 2] ^= 0xFF
    where.write_bytes_atomic(victim, bytes(data))
    report = verify(uri)
    assert len(report.errors) == 1
    assert f"{where.uri}/{victim}" in report.errors[0] and "sha256" in report.errors[0]


def test_missing_object_on_s3_fails_on_read_naming_it(s3):
    uri = s3()
    write_synthetic(uri, CONFIG)
    where = Location.parse(uri)
    victim = load_manifest(uri).shards[0].file
    where.delete(victim)
    with pytest.raises(ShardError, match=f"{victim}: listed in the manifest but missing"):
        Dataset(uri)[0]


WRITER = """
import sys
from shared.shards import ShardWriter
from shared.synth import SynthConfig, synthetic_samples
config = SynthConfig(**{config!r})
writer = ShardWriter(sys.argv[1], config.header(), shard_bytes=config.shard_bytes)
done = writer.done_ids()
for sample in synthetic_samples(config):
    if sample.sample_id not in done:
        writer.add(sample)
        print("added", flush=True)
writer.close()
print("closed", flush=True)
"""


def _writer(uri: str) -> subprocess.Popen:
    script = WRITER.format(config={k: getattr(CONFIG, k) for k in CONFIG.__slots__})
    return subprocess.Popen([sys.executable, "-c", script, uri], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2], env={**os.environ, **CREDENTIALS})


def test_writer_killed_while_writing_to_s3_resumes_to_each_sample_exactly_once(s3, local_reference):
    uri = s3()
    proc = _writer(uri)
    for _ in range(9):
        assert proc.stdout.readline().startswith("added")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load_manifest(uri)
    assert not killed.complete and killed.rows <= 9
    assert verify(uri).ok  # only whole, listed objects are visible

    proc = _writer(uri)
    assert proc.stdout.read().rstrip().endswith("closed")
    assert proc.wait() == 0
    _same_dataset(uri, local_reference)
    listed = {s.file for s in load_manifest(uri).shards} | {"manifest.json"}
    assert set(Location.parse(uri).list_files()) == listed  # nothing unlisted is left behind


def test_fsspec_only_scheme_goes_through_fsspec(local_reference):
    pytest.importorskip("fsspec")
    uri = "memory://specmill-test/ds"
    write_synthetic(uri, CONFIG)
    assert isinstance(Location.parse(uri).fs, pafs.PyFileSystem)
    _same_dataset(uri, local_reference)


def test_unknown_scheme_is_refused_by_name():
    with pytest.raises(ValueError, match="nosuchfs://x/y: neither pyarrow"):
        Dataset("nosuchfs://x/y")
