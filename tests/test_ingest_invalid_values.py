"""Values no sensor produces are counted and kept out of the statistics; corrupt dataset files are named.

Faults are injected into real GeoTIFFs (the shipped SEN12MS patches and the synthetic generator's) and
into the written catalog and manifest, then the real writer and readers run on them.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from eossl.ingest.config import IngestConfig
from eossl.ingest.integrity import DatasetCorruptError, read_catalog, read_manifest
from eossl.ingest.read import ReadOptions
from eossl.ingest.sample_data import write_sample_data
from eossl.ingest.stats import BandStats, implausible_spread
from eossl.ingest.storage import DatasetRoot
from eossl.ingest.validity import invalid_mask
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest
from eossl.streaming.loader import LoaderConfig, SSLLoader

from conftest import complete_triplet, read_tif, run_cli, sen12ms_path, write_tif


def _rewrite(path: Path, data: np.ndarray, nodata=None) -> None:
    _, meta = read_tif(path)
    path.unlink()
    write_tif(path, data, meta["crs"], meta["transform"], nodata=nodata)


def _ingest(src: Path, out: Path, **read) -> dict:
    cfg = IngestConfig(source=str(src), dataset=str(out), read=ReadOptions(**read), progress=False)
    run_ingest(cfg)
    return json.loads((out / "manifest.json").read_text())


def _rejects(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def _s1_reference(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and std per band over every finite in-range pixel of the given S1 files."""
    bands = [[], []]
    for f in files:
        s1 = read_tif(f)[0].astype(np.float64)
        for c in range(2):
            v = s1[c].ravel()
            bands[c].append(v[np.isfinite(v) & (v >= -60) & (v <= 40)])
    values = [np.concatenate(b) for b in bands]
    return np.array([v.mean() for v in values]), np.array([v.std() for v in values])


def test_undeclared_fill_in_one_patch_does_not_poison_statistics(tmp_path):
    """Four S1 pixels at 1e30 in one of 12 patches: counted, written as stored, absent from the stats."""
    src = tmp_path / "src"
    written = write_sample_data(src, 12, seed=3, patches_per_scene=4)
    s1_files = [p for p in written if "_s1_" in p.name]
    bad = s1_files[5]
    s1, _ = read_tif(bad)
    s1[0, 100, 100:104] = 1e30
    _rewrite(bad, s1)

    out = tmp_path / "ds"
    manifest = _ingest(src, out)
    assert manifest["counts"]["samples_written"] == 12
    assert manifest["counts"]["invalid_pixels"] == {"s1": 4, "s2": 0, "lc": 0}
    stats = manifest["stats"]["s1"]
    mean, std = _s1_reference(s1_files)  # the 1e30 pixels fall outside [-60, 40] dB
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-5)
    # ... and close to the statistics of the dataset without that patch at all.
    mean_wo, std_wo = _s1_reference([f for f in s1_files if f != bad])
    np.testing.assert_allclose(stats["mean"], mean_wo, atol=0.5)
    np.testing.assert_allclose(stats["std"], std_wo, rtol=0.1)
    assert manifest["flags"] == []
    assert all(s < 20 for s in stats["std"]) and all(r < 20 for r in stats["robust_std"])

    group = zarr.open_group(str(out / "data.zarr"), mode="r")
    row = [str(k) for k in group["key"][:]].index(bad.name.replace("_s1_", "_").removesuffix(".tif"))
    assert group["s1_invalid_pixels"][row] == 4
    assert group["s1"][row].tobytes() == s1.tobytes()  # the data are written exactly as stored
    assert verify(str(out), deep=True) == []


def test_patches_over_the_invalid_limits_are_rejected_and_under_them_counted(tmp_path):
    src = tmp_path / "src"
    complete_triplet(src, scene=1, patch=1)  # clean
    fill = 256 * 256 * 2 // 100  # 2 % of one band

    files = complete_triplet(src, scene=1, patch=2)  # S1 over the limit with finite fill values
    s1 = read_tif(files["s1"])[0]
    s1[1].reshape(-1)[:fill] = -9999.0  # not declared as nodata
    _rewrite(files["s1"], s1)

    files = complete_triplet(src, scene=1, patch=3)  # S2 saturated over the limit
    s2 = read_tif(files["s2"])[0]
    s2[3].reshape(-1)[:fill] = 65535
    _rewrite(files["s2"], s2)

    files = complete_triplet(src, scene=1, patch=4)  # S2: 20 saturated pixels, below the limit
    s2_few = read_tif(files["s2"])[0]
    s2_few[3, 0, :20] = 65535
    _rewrite(files["s2"], s2_few)

    files = complete_triplet(src, scene=1, patch=5)  # LC: codes outside the legend, below the limit
    lc_few = read_tif(files["lc"])[0]
    lc_few[2, 0, :7] = 99  # 99 is no LCCS land-use code
    _rewrite(files["lc"], lc_few)

    files = complete_triplet(src, scene=1, patch=6)  # LC over the limit
    lc = read_tif(files["lc"])[0]
    lc[0].reshape(-1)[:fill] = 0  # IGBP 0 is not a class
    _rewrite(files["lc"], lc)

    out = tmp_path / "ds"
    manifest = _ingest(src, out)
    rejects = _rejects(out)
    assert set(rejects) == {"ROIs1970_fall_1_p2", "ROIs1970_fall_1_p3", "ROIs1970_fall_1_p6"}
    reasons = {key: r["reason"] for key, r in rejects.items()}
    assert (
        "S1 has 2.00% NaN/Inf/nodata pixels or values outside [-60, 40] dB" in reasons["ROIs1970_fall_1_p2"]
    )
    assert "S2 has 2.00% nodata (0), saturated (65535)" in reasons["ROIs1970_fall_1_p3"]
    assert "LC has 2.00% class codes outside the layer's MODIS legend" in reasons["ROIs1970_fall_1_p6"]
    for patch, mod in ((2, "s1"), (3, "s2"), (6, "lc")):  # each reject names the offending file
        errors = rejects[f"ROIs1970_fall_1_p{patch}"]["errors"]
        assert [Path(e["file"]).name for e in errors] == [sen12ms_path(src, mod, scene=1, patch=patch).name]
    assert manifest["counts"]["invalid_pixels"] == {"s1": 0, "s2": 20, "lc": 7}

    # S2 statistics: exact over the clean pixels of the three written patches, saturation left out.
    clean = read_tif(files["s2"])[0].astype(np.float64)  # p6's S2 is the real p839 S2
    b4 = np.concatenate([clean[3].ravel()] * 2 + [s2_few[3].ravel()[20:].astype(np.float64)])
    stats = manifest["stats"]["s2"]
    assert stats["count"][3] == b4.size and stats["max"][3] == clean[3].max()
    np.testing.assert_allclose(stats["mean"][3], b4.mean(), rtol=1e-9)
    np.testing.assert_allclose(stats["std"][3], b4.std(), rtol=1e-9)

    group = zarr.open_group(str(out / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    assert group["s2_invalid_pixels"][keys.index("ROIs1970_fall_1_p4")] == 20
    assert group["lc_invalid_pixels"][keys.index("ROIs1970_fall_1_p5")] == 7
    assert np.array_equal(group["s2"][keys.index("ROIs1970_fall_1_p4")], s2_few)  # kept as stored
    assert np.array_equal(group["lc"][keys.index("ROIs1970_fall_1_p5")], lc_few)
    with tarfile.open(out / "shards" / "shard-000000.tar") as tar:  # the per-sample JSON member counts too
        meta = json.loads(tar.extractfile("ROIs1970_fall_1_p4.json").read())
    assert (meta["s1_invalid_pixels"], meta["s2_invalid_pixels"], meta["lc_invalid_pixels"]) == (0, 20, 0)
    assert verify(str(out), deep=True) == []

    # A looser limit keeps the saturated patch (counted), the same option for LC keeps the LC patch.
    out2 = tmp_path / "ds2"
    manifest = _ingest(src, out2, max_s2_invalid_fraction=0.05, max_lc_invalid_fraction=0.05)
    assert set(_rejects(out2)) == {"ROIs1970_fall_1_p2"}
    assert manifest["counts"]["invalid_pixels"] == {"s1": 0, "s2": 20 + fill, "lc": 7 + fill}
    assert manifest["options"]["read"]["max_s2_invalid_fraction"] == 0.05


def test_invalid_masks_follow_the_band_table():
    s1 = np.zeros((2, 4, 4), np.float32)
    s1[0, 0, :4] = [np.nan, np.inf, -60.5, 40.5]
    s1[1, 0, :3] = [-60.0, 40.0, -9999.0]
    mask = invalid_mask("s1", s1, nodata=-9999.0)
    assert mask[0, 0].tolist() == [True, True, True, True] and mask[1, 0].tolist() == [
        False,
        False,
        True,
        False,
    ]
    s2 = np.full((13, 2, 2), 1000, np.uint16)
    s2[0, 0] = [0, 65535]
    s2[1, 0] = [20000, 20001]
    mask = invalid_mask("s2", s2)
    assert mask[0, 0].tolist() == [True, True] and mask[1, 0].tolist() == [False, True] and mask.sum() == 3
    lc = np.array([[[17, 18]], [[16, 17]], [[36, 255]], [[51, 52]]], np.uint8)  # one legend per layer
    assert invalid_mask("lc", lc)[:, 0].tolist() == [
        [False, True],
        [False, True],
        [False, False],
        [False, True],
    ]


def test_band_stats_leave_masked_pixels_out_and_flag_an_implausible_spread():
    rng = np.random.default_rng(0)
    patch = rng.normal(-12, 3, size=(2, 32, 32)).astype(np.float32)
    poisoned = patch.copy()
    poisoned[0, 0, :4] = 1e30
    st = BandStats.empty("s1")
    st.update(poisoned, valid=~invalid_mask("s1", poisoned))
    ref = BandStats.empty("s1")
    ref.update(patch[:, :, :], valid=~invalid_mask("s1", poisoned))
    assert st.summary() == ref.summary()
    summary = st.summary()
    assert implausible_spread("s1", summary) == []
    np.testing.assert_allclose(summary["robust_std"], 3, rtol=0.15)

    wide = BandStats.empty("s1")
    bimodal = np.where(rng.random((2, 32, 32)) < 0.5, -60.0, 40.0).astype(np.float32)  # in range, std ~50
    wide.update(bimodal, valid=~invalid_mask("s1", bimodal))
    flags = implausible_spread("s1", wide.summary())
    assert len(flags) == 2 and "band VV: std" in flags[0] and "above the plausible 20" in flags[0]


def test_implausible_spread_is_flagged_in_the_manifest_and_by_verify(tmp_path):
    src = tmp_path / "src"
    for p in (1, 2):
        files = complete_triplet(src, scene=1, patch=p)
        s1 = read_tif(files["s1"])[0]
        s1[:, :, :128] = -59.0
        s1[:, :, 128:] = 39.0
        _rewrite(files["s1"], s1)
    out = tmp_path / "ds"
    manifest = _ingest(src, out)
    assert [f.split(":")[0] for f in manifest["flags"]] == ["stats.s1 band VV", "stats.s1 band VH"]
    problems = verify(str(out))
    assert len(problems) == 2 and all("manifest.json flags stats.s1 band V" in p for p in problems)


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    src = tmp_path / "src"
    for p in (1, 2):
        complete_triplet(src, scene=1, patch=p)
    out = tmp_path / "ds"
    _ingest(src, out)
    return out


def test_flipped_byte_in_catalog_is_a_clear_error(small_dataset):
    catalog = small_dataset / "catalog.npz"
    data = bytearray(catalog.read_bytes())
    data[len(data) // 2] ^= 0x01
    catalog.write_bytes(bytes(data))
    out = DatasetRoot(str(small_dataset))
    with pytest.raises(DatasetCorruptError, match=r"catalog\.npz is corrupt: its sha256 differs.*re-run"):
        read_catalog(out, read_manifest(out))
    with pytest.raises(DatasetCorruptError, match=r"catalog\.npz is corrupt"):
        SSLLoader(str(small_dataset), LoaderConfig(batch_size=1, device="cpu"))
    problems = verify(str(small_dataset))
    assert len(problems) == 1 and "catalog.npz is corrupt" in problems[0]
    # Without a recorded digest, an undecodable catalog is still named (no bare BadZipFile).
    catalog.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(DatasetCorruptError, match=r"catalog\.npz is corrupt: cannot be decoded \(BadZipFile"):
        read_catalog(out, {})


def test_truncated_or_edited_manifest_is_a_clear_error(small_dataset):
    manifest = small_dataset / "manifest.json"
    text = manifest.read_text()
    out = DatasetRoot(str(small_dataset))
    assert read_manifest(out)["manifest_sha256"]  # the written manifest matches its digest
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(
        DatasetCorruptError, match=r"manifest\.json is corrupt: not valid JSON .*eossl verify"
    ):
        read_manifest(out)
    proc = run_cli("verify", str(small_dataset), check=False)
    assert proc.returncode != 0 and "manifest.json is corrupt" in proc.stdout + proc.stderr
    edited = json.loads(text)
    edited["counts"]["rejected"] += 1
    manifest.write_text(json.dumps(edited, indent=1))
    with pytest.raises(DatasetCorruptError, match="does not match its manifest_sha256"):
        read_manifest(out)
    with pytest.raises(DatasetCorruptError, match=r"manifest\.json is corrupt"):
        SSLLoader(str(small_dataset), LoaderConfig(batch_size=1, device="cpu"))


def test_cli_invalid_limits(tmp_path):
    """``--max-s2-invalid`` / ``--max-lc-invalid`` reach the reader and the manifest."""
    src = tmp_path / "src"
    files = complete_triplet(src, scene=1, patch=1)
    s2 = read_tif(files["s2"])[0]
    s2[0].reshape(-1)[:1310] = 65535  # 2 % of one band
    _rewrite(files["s2"], s2)
    out = tmp_path / "ds"
    proc = run_cli(
        "ingest", str(src), str(out), "--no-progress", "--max-s2-invalid", "0.05", "--max-lc-invalid", "0.02"
    )
    assert "1 written, 0 rejected" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["read"]["max_s2_invalid_fraction"] == 0.05
    assert manifest["options"]["read"]["max_lc_invalid_fraction"] == 0.02
    assert manifest["counts"]["invalid_pixels"]["s2"] == 1310
