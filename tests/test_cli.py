"""The real ``eossl`` command end to end: help, sample data -> ingest -> verify, exit codes, bench."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_help_lists_subcommands():
    out = run_cli("--help").stdout
    for cmd in ("sample-data", "ingest", "verify", "bench"):
        assert cmd in out
    assert "merge" in run_cli("ingest", "--help").stdout


@pytest.mark.slow
def test_sample_data_ingest_verify_and_tamper(tmp_path):
    src, ds = tmp_path / "src", tmp_path / "ds"
    assert "wrote 24 GeoTIFFs" in run_cli("sample-data", str(src), "--patches", "8", "--seed", "3").stdout
    proc = run_cli("ingest", str(src), str(ds), "--workers", "2", "--shard-size", "8MB", "--budgets", "2",
                   "--holdout-fraction", "0.5")
    assert "8 patches found, 8 written, 0 rejected" in proc.stdout
    assert "patch/s" in proc.stderr  # the progress bar reports rate and ETA
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["command"][:2] == ["eossl", "ingest"]
    assert len(manifest["shards"]) == 3  # 3 samples per 8 MB shard
    assert manifest["counts"]["with_lc"] == 8 and manifest["labels"]["with_labels"] == 8
    assert run_cli("verify", str(ds), "--deep").returncode == 0

    shard = ds / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", str(ds), check=False)
    assert proc.returncode == 1 and "shard-000001.tar" in proc.stdout and "sha256" in proc.stdout


@pytest.mark.slow
def test_bad_usage_exit_codes(tmp_path):
    assert run_cli("ingest", "a", "b", "--part", "3/2", check=False).returncode == 2
    assert run_cli("ingest", "a", "b", "--shard-size", "big", check=False).returncode == 2
    assert run_cli("frobnicate", check=False).returncode == 2


@pytest.mark.slow
def test_bench_ingest_json(tmp_path):
    proc = run_cli("bench", "ingest", "--patches", "4", "--repeat", "1", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patches"] == 4
    for key in ("ingest_wds", "ingest_wds+zarr"):
        row = result[key]
        assert row["patches_per_s"] > 0 and row["ratio_vs_bare_read"] > 0
        assert row["shard_bytes_per_sample"] > 2_400_000  # raw arrays: s1 + s2 + lc
    assert result["ingest_wds+zarr"]["zarr_bytes_per_sample"] < result["ingest_wds+zarr"]["shard_bytes_per_sample"]
