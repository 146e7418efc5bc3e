"""Every kind of bad input becomes a reject with the file and a reason; the run goes on and counts add up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from rasterio.transform import Affine

from eossl.ingest.config import IngestConfig
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest

from conftest import REAL_LC_P30, complete_triplet, read_tif, run_cli, write_tif


def _rewrite(path: Path, data: np.ndarray, **kw) -> None:
    _, meta = read_tif(path)
    path.unlink()
    write_tif(path, data, kw.pop("crs", meta["crs"]), kw.pop("transform", meta["transform"]), **kw)


def _bad_tree(root: Path) -> dict[str, str]:
    """One good triplet and one broken triplet per failure mode; returns key -> expected reason fragment."""
    expected: dict[str, str] = {}
    complete_triplet(root, scene=1, patch=1)  # the good one
    cases = {
        2: "unreadable or truncated",  # truncated S2
        3: "unreadable or truncated",  # not a TIFF at all
        4: "wrong band count 3",
        5: "wrong shape 128x128",
        6: "wrong dtype float32 for s2",
        7: "grid mismatch",  # CRS differs
        8: "grid mismatch",  # origin shifted by one pixel
        9: "NaN/Inf/nodata",  # S1 mostly NaN
        10: "do not fit uint8",  # LC uint16 with codes > 255
        11: "missing required modality s2",
        12: "NaN/Inf/nodata",  # S1 nodata value declared and used
    }
    for patch in cases:
        files = complete_triplet(root, scene=2, patch=patch)
        s1, _ = read_tif(files["s1"])
        s2, _ = read_tif(files["s2"])
        if patch == 2:
            data = files["s2"].read_bytes()
            files["s2"].write_bytes(data[: len(data) // 2])
        elif patch == 3:
            files["s1"].write_bytes(b"this is not a tiff" * 100)
        elif patch == 4:
            _rewrite(files["s1"], np.concatenate([s1, s1[:1]]))
        elif patch == 5:
            _rewrite(files["s1"], np.ascontiguousarray(s1[:, :128, :128]))
        elif patch == 6:
            _rewrite(files["s2"], s2.astype(np.float32))
        elif patch == 7:
            _rewrite(files["s2"], s2, crs="EPSG:32651")
        elif patch == 8:
            _, meta = read_tif(files["s1"])
            _rewrite(
                files["lc"], read_tif(files["lc"])[0], transform=meta["transform"] @ Affine.translation(1, 0)
            )
        elif patch == 9:
            s1 = s1.copy()
            s1[0, :64] = np.nan
            _rewrite(files["s1"], s1)
        elif patch == 10:
            lc = read_tif(files["lc"])[0].astype(np.uint16)
            lc[1, 0, 0] = 300
            _rewrite(files["lc"], lc)
        elif patch == 11:
            files["s2"].unlink()
        elif patch == 12:
            s1 = s1.copy()
            s1[1, :10] = -9999.0
            _rewrite(files["s1"], s1, nodata=-9999.0)
        expected[f"ROIs1970_fall_2_p{patch}"] = cases[patch]
    return expected


@pytest.mark.slow
def test_bad_inputs_are_rejected_with_reasons(tmp_path):
    src = tmp_path / "src"
    expected = _bad_tree(src)
    # Tolerated irregularities: S1 with a few NaNs (below the limit), LC delivered as uint16.
    files = complete_triplet(src, scene=3, patch=1)
    s1, _ = read_tif(files["s1"])
    s1[0, 0, :100] = np.nan
    _rewrite(files["s1"], s1)
    files = complete_triplet(src, scene=3, patch=2)
    lc16 = read_tif(files["lc"])[0].astype(np.uint16)
    _rewrite(files["lc"], lc16)
    # Unknown files and folders (SEN12MS-CR cloudy folder, notes) are ignored with a warning.
    (src / "ROIs1970_fall" / "s2_cloudy_139").mkdir(parents=True)
    (src / "ROIs1970_fall" / "s2_cloudy_139" / "ROIs1970_fall_s2_cloudy_139_p1.tif").write_bytes(b"x")
    (src / "notes.txt").write_text("hello")

    out = tmp_path / "ds"
    proc = run_cli("ingest", str(src), str(out), "--workers", "2", "--shard-size", "5MB", "--no-progress")
    assert "ignoring 2 files" in proc.stderr
    assert f"{1 + len(expected) + 2} patches found, 3 written, {len(expected)} rejected" in proc.stdout

    rejects = {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == set(expected)
    for key, fragment in expected.items():
        assert fragment in rejects[key]["reason"], (key, rejects[key])
        assert rejects[key]["errors"] or "missing" in rejects[key]["reason"]
        for err in rejects[key]["errors"]:
            assert Path(err["file"]).name.startswith("ROIs1970_fall_")  # names the offending file
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["patches_found"] == c["samples_written"] + c["rejected"] == 14

    group = zarr.open_group(str(out / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    row = keys.index("ROIs1970_fall_3_p1")
    assert group["s1_invalid_pixels"][row] == 100
    assert np.isnan(group["s1"][row][0, 0, :100]).all()  # kept as stored, counted
    row = keys.index("ROIs1970_fall_3_p2")
    assert group["lc"].dtype == np.uint8
    assert np.array_equal(group["lc"][row], read_tif(REAL_LC_P30)[0])
    assert verify(str(out), deep=True) == []


@pytest.mark.slow
def test_unreadable_source_is_a_clear_error(tmp_path):
    proc = run_cli("ingest", str(tmp_path / "nope"), str(tmp_path / "ds"), check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "nope" in proc.stderr


def test_duplicate_files_for_one_patch_are_rejected(tmp_path):
    src = tmp_path / "src"
    files = complete_triplet(src, scene=5, patch=1)
    copy = src / "extra" / files["s1"].name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(files["s1"].read_bytes())
    cfg = IngestConfig(source=str(src), dataset=str(tmp_path / "ds"), progress=False)
    summary = run_ingest(cfg)
    assert (summary.written, summary.rejected) == (0, 1)
    reject = json.loads((tmp_path / "ds" / "rejects.jsonl").read_text())
    assert "duplicate" in reject["reason"] and "extra" in reject["reason"]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
def test_write_error_is_clear_and_leaves_no_corrupt_output(tmp_path):
    """A file-size limit makes every large write fail with EFBIG, like a full disk."""
    import resource
    import signal

    src = tmp_path / "src"
    for p in range(3):
        complete_triplet(src, scene=1, patch=p + 1)
    out = tmp_path / "ds"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = run_cli(
        "ingest", str(src), str(out), "--workers", "1", "--no-progress", check=False, preexec_fn=limit
    )
    assert proc.returncode == 1, proc.stderr
    assert "cannot write" in proc.stderr and "shard-000000.tar" in proc.stderr
    assert not (out / "manifest.json").exists()
    assert not list((out / "shards").glob("*")) if (out / "shards").exists() else True
    # Without the limit, the same command finishes the dataset.
    run_cli("ingest", str(src), str(out), "--workers", "1", "--no-progress")
    assert verify(str(out), deep=True) == []


def test_missing_output_cases(tmp_path):
    out = tmp_path / "ds"
    assert "missing" in verify(str(out))[0]
    proc = run_cli("ingest", "merge", str(out), check=False)
    assert proc.returncode == 1 and "holds no ingest" in proc.stderr
