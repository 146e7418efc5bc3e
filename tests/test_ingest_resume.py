"""Resume after a kill, --part i/N + merge equal to one run, and refusal to mix options."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from eossl.ingest.verify import verify

from conftest import complete_triplet, run_cli

# One patch per unit/shard: FULL_SAMPLE_BYTES is ~2.5 MB, so every patch is its own commit.
ONE_PER_SHARD = (
    "--shard-size",
    "3MB",
    "--zarr-shard-samples",
    "4",
    "--budgets",
    "4",
    "--budget-seeds",
    "0,1",
)


@pytest.fixture(scope="module")
def source(module_tmp) -> Path:
    root = module_tmp("resume") / "src"
    for scene in range(1, 7):
        for patch in range(1, 6):
            complete_triplet(root, scene=scene, patch=patch, x_offset=1280.0 * patch)
    return root


@pytest.fixture(scope="module")
def reference(source, module_tmp) -> Path:
    out = module_tmp("ref") / "ds"
    run_cli("ingest", str(source), str(out), "--workers", "1", "--no-progress", *ONE_PER_SHARD)
    return out


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _same_dataset(a: Path, b: Path) -> None:
    ma, mb = _manifest(a), _manifest(b)
    assert ma["shards"] == mb["shards"]  # same names, counts, sizes and sha256: byte-identical shards
    for field in ("counts", "stats", "labels", "splits", "subsets"):
        assert ma[field] == mb[field], field
    assert (a / "subsets.json").read_text() == (b / "subsets.json").read_text()
    za, zb = zarr.open_group(str(a / "data.zarr"), mode="r"), zarr.open_group(str(b / "data.zarr"), mode="r")
    for name in ("key", "split", "label_igbp_simple", "non_overlapping"):
        assert np.array_equal(za[name][:], zb[name][:]), name
    for mod in ("s1", "s2", "lc"):
        assert za[mod][:].tobytes() == zb[mod][:].tobytes(), mod


def test_reference_dataset_is_consistent(reference):
    m = _manifest(reference)
    assert m["counts"]["samples_written"] == 30 and len(m["shards"]) == 30
    assert set(m["subsets"]["budgets"]) == {"budget_4_seed0", "budget_4_seed1"}
    assert verify(str(reference), deep=True) == []
    assert not (reference / "_progress").exists()  # unit records (histograms) go once the dataset is final


def _config(source: Path, out: Path, *extra: str):
    import argparse

    from eossl.ingest.cli import _ingest_config, add_ingest_arguments

    parser = argparse.ArgumentParser()
    add_ingest_arguments(parser)
    return _ingest_config(parser.parse_args([str(source), str(out), "--no-progress", *extra]))


def test_rerun_of_a_final_dataset_is_checked_against_its_manifest(source, reference, tmp_path):
    from eossl.ingest.writer import IngestError, run_ingest

    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    summary = run_ingest(_config(source, reference, "--workers", "1", *ONE_PER_SHARD))
    assert summary.complete and summary.written == 30
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before  # nothing redone
    with pytest.raises(IngestError, match=r"manifest\.json records a finished ingest with different options"):
        run_ingest(_config(source, reference, *ONE_PER_SHARD[:-2], "--budget-seeds", "0"))
    assert not (reference / "_progress").exists()


@pytest.mark.slow
def test_resume_after_kill_finishes_without_redoing_units(source, reference, tmp_path):
    out = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "eossl.launch",
        "ingest",
        str(source),
        str(out),
        "--workers",
        "1",
        "--no-progress",
        *ONE_PER_SHARD,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = out / "_progress" / "unit-000005.json"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "ingest ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert not (out / "manifest.json").exists()
    for tar_path in (out / "shards").glob("*.tar"):  # every shard under its final name is whole
        with tarfile.open(tar_path) as tar:
            assert len(tar.getnames()) >= 2
    records = list((out / "_progress").glob("unit-*.json"))
    assert 6 <= len(records) < 30
    # A redone unit rewrites its shard; the records themselves are gone once the dataset is final.
    shards = [out / json.loads(p.read_text())["shard"]["path"] for p in records]
    committed = {p: p.stat().st_mtime_ns for p in shards}

    proc = run_cli(*cmd[3:])
    assert "30 patches found, 30 written, 0 rejected" in proc.stdout
    for p, mtime in committed.items():
        assert p.stat().st_mtime_ns == mtime, f"{p.name} was redone"
    assert not (out / "_progress").exists()
    assert not list(out.rglob(".*.tmp-*"))
    _same_dataset(out, reference)
    assert verify(str(out)) == []


@pytest.mark.slow
def test_parts_then_merge_equal_one_run(source, reference, tmp_path):
    out = tmp_path / "ds"
    common = ("--workers", "2", "--no-progress", *ONE_PER_SHARD)
    proc = run_cli("ingest", str(source), str(out), "--part", "0/2", *common)
    assert "part done (15/30 units)" in proc.stdout
    assert not (out / "manifest.json").exists()
    early = run_cli("ingest", "merge", str(out), check=False)
    assert early.returncode == 1 and "not written yet" in early.stderr and "part-0-of-2" in early.stderr

    run_cli("ingest", str(source), str(out), "--part", "1/2", *common)
    proc = run_cli("ingest", "merge", str(out), "--workers", "2")
    assert "30 written, 0 rejected" in proc.stdout
    _same_dataset(out, reference)
    assert run_cli("verify", str(out), "--deep").returncode == 0


@pytest.mark.slow
def test_rerun_with_other_options_is_refused(source, reference, tmp_path):
    out = tmp_path / "ds"
    run_cli("ingest", str(source), str(out), "--part", "0/3", "--no-progress", *ONE_PER_SHARD)
    proc = run_cli(
        "ingest", str(source), str(out), "--part", "1/3", "--no-progress", "--shard-size", "10MB", check=False
    )
    assert proc.returncode == 1
    assert "different" in proc.stderr and "plan.json" in proc.stderr


def test_rerun_of_finished_dataset_is_a_no_op(source, reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    proc = run_cli("ingest", str(source), str(reference), "--no-progress", *ONE_PER_SHARD)
    assert "ingest complete: 30 patches found, 30 written" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before
