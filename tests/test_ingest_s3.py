"""Ingest from and to an S3-compatible server (a real moto_server process on 127.0.0.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import zarr

from eossl.ingest.storage import DatasetRoot
from eossl.ingest.verify import verify

from conftest import complete_triplet, run_cli
from servers import upload_tree


@pytest.mark.slow
def test_ingest_s3_to_s3_equals_local(s3_endpoint, real_source, tmp_path):
    complete_triplet(real_source, scene=7, patch=1)
    complete_triplet(real_source, scene=7, patch=2, x_offset=1280.0)
    upload_tree(real_source, "s3://sen12ms-src/raw")
    fs = s3fs.S3FileSystem()
    fs.mkdir("eossl-out")  # eossl writes into existing buckets; it never creates one
    local = tmp_path / "local"
    run_cli(
        "ingest", str(real_source), str(local), "--no-progress", "--shard-size", "5MB", "--required", "s1"
    )
    proc = run_cli(
        "ingest",
        "s3://sen12ms-src/raw",
        "s3://eossl-out/ds",
        "--no-progress",
        "--shard-size",
        "5MB",
        "--required",
        "s1",
        "--workers",
        "2",
    )
    assert "4 patches found, 4 written, 0 rejected" in proc.stdout

    remote = json.loads(fs.cat_file("eossl-out/ds/manifest.json"))
    manifest = json.loads((local / "manifest.json").read_text())
    # Same bytes in the shards whatever the storage (relative file paths in the JSON members).
    assert [(s["path"], s["sha256"]) for s in remote["shards"]] == [
        (s["path"], s["sha256"]) for s in manifest["shards"]
    ]
    assert remote["counts"] == manifest["counts"] and remote["stats"] == manifest["stats"]
    group = zarr.open_group(
        DatasetRoot("s3://eossl-out/ds").zarr_store("data.zarr", read_only=True), mode="r"
    )
    local_group = zarr.open_group(str(local / "data.zarr"), mode="r")
    assert np.array_equal(group["key"][:], local_group["key"][:])
    assert group["s2"][:].tobytes() == local_group["s2"][:].tobytes()
    assert verify("s3://eossl-out/ds", deep=True) == []
    assert run_cli("verify", "s3://eossl-out/ds").returncode == 0
