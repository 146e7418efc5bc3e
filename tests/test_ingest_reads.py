"""Finalize and verify read each shard's bytes once, whatever the block and shard sizes (bytes counted by
the kernel for this process: ``rchar`` in /proc/self/io), and ``verify`` answers the same in parallel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eossl.ingest.config import IngestConfig
from eossl.ingest.finalize import finalize
from eossl.ingest.storage import DatasetRoot
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def unfinished(synthetic_source, module_tmp) -> Path:
    """Every unit written (3 patches per 8 MB shard), not finalized; Zarr blocks of 2 samples, so most
    shards span two blocks (a per-block re-read of whole shards would read them about twice)."""
    out = module_tmp("reads") / "ds"
    for part in ((0, 2), (1, 2)):
        cfg = IngestConfig(
            str(synthetic_source),
            str(out),
            workers=1,
            part=part,
            shard_bytes=8 * 10**6,
            zarr_shard_samples=2,
            progress=False,
        )
        run_ingest(cfg)
    return out


def test_finalize_reads_each_shard_once(unfinished, tmp_path):
    out = Path(shutil.copytree(unfinished, tmp_path / "ds"))
    shards = _tree_bytes(out / "shards")
    progress = _tree_bytes(out / "_progress")
    before = _bytes_read()
    manifest = finalize(DatasetRoot(str(out)), workers=1, command=("test",))
    read = _bytes_read() - before
    assert manifest["counts"]["samples_written"] == 24 and len(manifest["shards"]) == 8
    # members' bytes once (less than the shards: tar headers and JSON are skipped), records once, and
    # a margin of 25 % of the shards for zarr metadata and imports
    assert read < shards + progress + shards // 4, (read, shards, progress)
    assert not (out / "_progress").exists()
    assert verify(str(out), deep=True) == []


def test_verify_reads_each_shard_once_and_in_parallel_gives_the_same_answer(unfinished, tmp_path):
    out = Path(shutil.copytree(unfinished, tmp_path / "ds"))
    finalize(DatasetRoot(str(out)), workers=1, command=("test",))
    shards = _tree_bytes(out / "shards")
    zarr_bytes = _tree_bytes(out / "data.zarr")
    before = _bytes_read()
    assert verify(str(out)) == []
    assert _bytes_read() - before < shards + shards // 10  # hash, keys and members from one read
    before = _bytes_read()
    assert verify(str(out), deep=True) == []
    assert _bytes_read() - before < shards + zarr_bytes + shards // 10  # and each Zarr row once

    # damage one shard and one Zarr row: the same problems in one process and in two
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][3]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    import zarr

    group = zarr.open_group(str(out / "data.zarr"), mode="r+")
    row = group["s2"][1]
    group["s2"][1] = np.where(row == 0, 1, 0).astype(row.dtype)
    serial = verify(str(out), deep=True, workers=1)
    assert any("sha256/size differ" in p and shard.name in p for p in serial)
    assert any("s2 differs between" in p for p in serial)
    assert verify(str(out), deep=True, workers=2) == serial
