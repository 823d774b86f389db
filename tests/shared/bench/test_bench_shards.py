"""`specmill shards bench` on a tiny real data set, through the real command line."""

from __future__ import annotations

import json

import pytest

from shared.bench import shards as bench
from shared.cli import main

TINY = ["--samples", "8", "--hidden", "256", "--mean-tokens", "128", "--no-cold", "--warm-passes", "2",
        "--random-seconds", "0.05", "--disk-probe-mb", "16"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["shards", "bench", "--dir", str(out), "--json", str(out / "bench.json"), *TINY]) == 0
    figures = json.loads((out / "bench.json").read_text())
    figures["_png"] = (out / "bench.png").read_bytes()
    figures["_left"] = sorted(p.name for p in out.iterdir())
    return figures


def test_every_format_reports_positive_figures(figures):
    assert list(figures["formats"]) == list(bench.FORMATS)
    for name, f in figures["formats"].items():
        for key in ("write_mbps", "bytes_per_token", "warm_mbps", "warm_memcpy_mbps", "random_samples_per_s"):
            assert f[key] > 0, (name, key)
        assert f["cold_mbps"] is None, name  # --no-cold
    assert figures["limits"]["memcpy_mbps"] > 0 and figures["limits"]["disk_read_mbps"] > 0
    assert figures["limits"]["disk_spread_mbps"] > 0 and figures["limits"]["disk_spread_buffers"] == 4


def test_uncompressed_shipped_format_costs_the_raw_bytes(figures):
    shipped = figures["formats"][bench.SHIPPED]
    assert shipped["bytes_vs_raw"] == pytest.approx(1.0, abs=0.03)
    assert shipped["bytes_per_token"] == pytest.approx(figures["data"]["raw_bytes_per_token"], rel=0.03)


def test_zstd_layouts_are_smaller_than_uncompressed(figures):
    size = {name: f["bytes"] for name, f in figures["formats"].items()}
    assert size["arrow-ipc-zstd"] < size["arrow-ipc"]
    assert size["parquet-zstd"] < size["parquet"]
    # byte-stream-split puts the compressible exponent bytes together
    assert size["parquet-bss-zstd"] < size["parquet-zstd"]


def test_shipped_ratios_are_computed_from_the_reported_figures(figures):
    shipped, baseline = figures["formats"][bench.SHIPPED], figures["formats"][bench.BASELINE]
    assert shipped["warm_memcpy_mbps"] in figures["limits"]["memcpy_passes_mbps"]
    assert shipped["warm_read_ratio"] == pytest.approx(shipped["warm_mbps"] / shipped["warm_memcpy_mbps"])
    assert shipped["speedup_vs_torch_save"] == pytest.approx(shipped["warm_mbps"] / baseline["warm_mbps"])
    assert shipped["cold_read_ratio"] is None  # no cold reads, no ratio
    verdict = figures["verdict"]
    assert verdict["warm_read_ratio"] == {"value": shipped["warm_read_ratio"], "goal": 0.8,
                                          "pass": shipped["warm_read_ratio"] >= 0.8}
    assert verdict["cold_read_ratio"]["pass"] is None


def test_writes_a_chart_and_cleans_up_its_scratch_directory(figures):
    assert figures["_png"].startswith(b"\x89PNG")
    assert figures["_left"] == ["bench.json", "bench.png"]


def test_unknown_format_is_rejected_by_name():
    with pytest.raises(ValueError, match="formats has unknown 'hdf5'; choose from arrow-ipc"):
        bench.BenchConfig(formats=("parquet", "hdf5"), cold=False)


class _ScriptedProbe:
    def __init__(self, figures):
        self.figures = iter(figures)

    def read_mbps(self) -> float:
        return next(self.figures)


def test_the_cold_figure_is_the_median_round_each_against_its_own_probes(monkeypatch, tmp_path):
    # Scripted disk and reads: probes drift 1000 -> 3000 MB/s; the three reads take the same time.
    probe = _ScriptedProbe([1000.0, 1000.0, 3000.0, 3000.0, 2000.0, 2000.0])
    spread = _ScriptedProbe([900.0, 900.0, 1800.0, 1800.0, 1500.0, 1500.0])
    monkeypatch.setattr(bench, "drop_page_cache", lambda: None)
    monkeypatch.setattr(bench, "_read_pass", lambda *a: (1.0, 1800e6))  # 1800 MB/s each round
    config = bench.BenchConfig(cold=False, cold_passes=3)
    config.cold = True  # set after the root check: nothing is dropped here
    run = bench._Run(disk_mbps=[])
    got = bench._measure_cold(bench.FORMATS[bench.SHIPPED], tmp_path, None, (probe, spread), run, config)
    assert [r["cold_vs_disk"] for r in got["cold_rounds"]] == [1.8, 0.6, 0.9]
    assert [r["cold_vs_disk_spread"] for r in got["cold_rounds"]] == [2.0, 1.0, 1.2]
    assert (got["cold_vs_disk"], got["cold_mbps"], got["cold_disk_mbps"]) == (0.9, 1800.0, 2000.0)
    assert got["cold_vs_disk_spread"] == 1.2  # the same (median) round's
    assert run.disk_mbps == [1000.0, 1000.0, 3000.0, 3000.0, 2000.0, 2000.0]
    assert run.spread_mbps == [900.0, 900.0, 1800.0, 1800.0, 1500.0, 1500.0]
    with pytest.raises(ValueError, match="cold_passes must be positive"):
        bench.BenchConfig(cold=False, cold_passes=0)


def test_the_spread_probe_reads_each_chunk_into_the_next_of_its_buffers(tmp_path):
    one = bench.DiskProbe(tmp_path / "probe.bin", 32 << 20)
    spread = bench.DiskProbe(one.path, 32 << 20, buffers=2, write=False)
    assert one.read_mbps() > 0 and spread.read_mbps() > 0
    data = one.path.read_bytes()
    assert len(data) == 32 << 20
    assert bytes(spread._buffers[0]) == data[:16 << 20] and bytes(spread._buffers[1]) == data[16 << 20:]
    # one buffer, read last by two threads in turn, 4 MiB each: chunks 6 and 7 are what is left
    assert bytes(one._buffers[0])[:8 << 20] == data[24 << 20:]
    assert one.requests == (4 << 20, 16 << 20) and spread.requests == (16 << 20,)


def test_the_one_buffer_probe_counts_the_faster_request_size(tmp_path, monkeypatch):
    one = bench.DiskProbe(tmp_path / "probe.bin", 16 << 20)
    seen = []
    assert one._read_mbps(4 << 20, in_flight=2) > 0  # two threads take turns over the file
    rates = {(4 << 20, 1): 900.0, (16 << 20, 1): 700.0, (4 << 20, 2): 800.0}
    monkeypatch.setattr(one, "_read_mbps", lambda request, in_flight=1: seen.append((request, in_flight))
                        or rates[request, in_flight])
    assert one.read_mbps() == 900.0 and seen == list(rates)
