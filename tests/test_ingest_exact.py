"""Exactness on the real SEN12MS patches: shards (webdataset and tarfile) and Zarr equal the GeoTIFFs bit for
bit."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
import zarr

from eossl.ingest.config import IngestConfig
from eossl.ingest.read import ReadOptions
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest

from conftest import REAL_LC_P30, REAL_S1_P30, REAL_S1_P839, REAL_S2_P839, read_tif

EXPECTED = {
    "ROIs1158_spring_1_p30": {"s1": REAL_S1_P30, "lc": REAL_LC_P30},
    "ROIs1970_fall_139_p839": {"s1": REAL_S1_P839, "s2": REAL_S2_P839},
}


@pytest.fixture
def real_dataset(real_source, tmp_path):
    """Both real patches written: only s1 is required (neither patch is a complete triplet)."""
    cfg = IngestConfig(
        source=str(real_source),
        dataset=str(tmp_path / "ds"),
        read=ReadOptions(required=("s1",)),
        progress=False,
    )
    summary = run_ingest(cfg)
    assert (summary.found, summary.written, summary.rejected) == (2, 2, 0)
    return tmp_path / "ds"


def test_tarfile_members_equal_geotiffs(real_dataset):
    manifest = json.loads((real_dataset / "manifest.json").read_text())
    seen = set()
    for shard in manifest["shards"]:
        with tarfile.open(real_dataset / shard["path"]) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                if ext == "json":
                    continue
                mod = ext.removesuffix(".npy")
                hwc = np.load(io.BytesIO(tar.extractfile(info).read()))
                expected, _ = read_tif(EXPECTED[key][mod])
                if mod == "lc":
                    assert hwc.dtype == np.uint8
                assert hwc.dtype == expected.dtype
                assert np.moveaxis(hwc, -1, 0).tobytes() == expected.tobytes()
                seen.add((key, mod))
    assert seen == {(k, m) for k, mods in EXPECTED.items() for m in mods}


def test_webdataset_library_reads_samples(real_dataset):
    manifest = json.loads((real_dataset / "manifest.json").read_text())
    urls = [str(real_dataset / s["path"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(EXPECTED)
    for s in samples:
        meta = s["json"]
        assert meta["key"] == s["__key__"]
        for mod, path in EXPECTED[s["__key__"]].items():
            expected, geo = read_tif(path)
            assert np.moveaxis(s[f"{mod}.npy"], -1, 0).tobytes() == expected.tobytes()
            assert meta["crs"] == geo["crs"].to_string()
            assert meta["transform"] == list(geo["transform"][:6])
        assert meta["modalities"] == {m: m in EXPECTED[s["__key__"]] for m in ("s1", "s2", "lc")}
        absent = {"s1", "s2", "lc"} - set(EXPECTED[s["__key__"]])
        assert not any(f"{m}.npy" in s for m in absent)


def test_plain_zarr_reads_arrays_and_metadata(real_dataset):
    group = zarr.open_group(str(real_dataset / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    assert sorted(keys) == sorted(EXPECTED)
    assert group["s1"].shape == (2, 2, 256, 256) and group["s1"].dtype == np.float32
    assert group["s2"].shape == (2, 13, 256, 256) and group["s2"].dtype == np.uint16
    assert group["lc"].shape == (2, 4, 256, 256)
    for row, key in enumerate(keys):
        for mod in ("s1", "s2", "lc"):
            has = bool(group[f"has_{mod}"][row])
            assert has == (mod in EXPECTED[key])
            if has:
                expected, _ = read_tif(EXPECTED[key][mod])
                assert group[mod][row].tobytes() == expected.tobytes()
            elif mod == "s1":
                assert np.isnan(group[mod][row]).all()
            else:
                assert not group[mod][row].any()  # fill value 0
    p30 = keys.index("ROIs1158_spring_1_p30")
    lc, _ = read_tif(REAL_LC_P30)
    counts = np.bincount(lc[0].ravel(), minlength=18)[1:18]
    assert group["label_igbp"][p30] == int(np.argmax(counts)) + 1
    assert group["label_igbp"][keys.index("ROIs1970_fall_139_p839")] == 0  # no land cover, no label
    assert group.attrs["format"] == "eossl-sen12ms"


def test_manifest_counts_stats_and_verify(real_dataset):
    manifest = json.loads((real_dataset / "manifest.json").read_text())
    assert manifest["counts"]["patches_found"] == 2
    assert manifest["counts"]["with_s2"] == 1 and manifest["counts"]["with_lc"] == 1
    s2, _ = read_tif(REAL_S2_P839)
    stats = manifest["stats"]["s2"]
    np.testing.assert_allclose(stats["mean"], s2.reshape(13, -1).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], s2.reshape(13, -1).std(axis=1), rtol=1e-5)
    assert stats["percentiles"]["p50"] == [
        float(v) for v in np.percentile(s2.reshape(13, -1), 50, axis=1, method="inverted_cdf")
    ]
    s1 = np.concatenate([read_tif(REAL_S1_P30)[0], read_tif(REAL_S1_P839)[0]], axis=1).reshape(2, -1)
    np.testing.assert_allclose(manifest["stats"]["s1"]["mean"], s1.astype(np.float64).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(
        manifest["stats"]["s1"]["percentiles"]["p50"], np.median(s1, axis=1), atol=0.01
    )
    assert verify(str(real_dataset), deep=True) == []


def test_default_requirements_reject_incomplete_patch(real_source, tmp_path):
    """Default: s1 and s2 required. p30 (no S2) is a reject with its reason; p839 is written."""
    cfg = IngestConfig(source=str(real_source), dataset=str(tmp_path / "ds"), progress=False)
    summary = run_ingest(cfg)
    assert (summary.found, summary.written, summary.rejected) == (2, 1, 1)
    rejects = [json.loads(line) for line in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["ROIs1158_spring_1_p30"]
    assert "missing required modality s2" in rejects[0]["reason"]
    assert verify(str(tmp_path / "ds"), deep=True) == []


@pytest.mark.parametrize("formats", ["wds", "zarr"])
def test_single_format_outputs(real_source, tmp_path, formats):
    out = tmp_path / "ds"
    cfg = IngestConfig(
        source=str(real_source),
        dataset=str(out),
        formats=(formats,),
        read=ReadOptions(required=("s1",)),
        progress=False,
    )
    run_ingest(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "data.zarr").exists() == (formats == "zarr")
    assert bool(list(out.rglob("*.tar"))) == (formats == "wds")  # zarr-only: staged shards are removed
    assert bool(manifest["shards"]) == (formats == "wds")
    if formats == "zarr":
        group = zarr.open_group(str(out / "data.zarr"), mode="r")
        row = [str(k) for k in group["key"][:]].index("ROIs1970_fall_139_p839")
        assert group["s2"][row].tobytes() == read_tif(REAL_S2_P839)[0].tobytes()
    assert verify(str(out)) == []


def test_xarray_opens_the_store(real_dataset):
    import xarray as xr

    ds = xr.open_zarr(str(real_dataset / "data.zarr"), consolidated=False)
    assert ds["s2"].dims == ("sample", "s2_band", "y", "x") and ds.sizes["s1_band"] == 2
    keys = [str(k) for k in ds["key"].values]
    row = keys.index("ROIs1970_fall_139_p839")
    assert ds["s2"][row].values.tobytes() == read_tif(REAL_S2_P839)[0].tobytes()
    assert ds["s2"].attrs["bands"][8] == "B8A"


def test_catalog_offsets_read_members_directly(real_dataset):
    from eossl.ingest.catalog import Catalog

    manifest = json.loads((real_dataset / "manifest.json").read_text())
    catalog = Catalog.from_bytes((real_dataset / "catalog.npz").read_bytes())
    assert sorted(catalog.key.tolist()) == sorted(EXPECTED)
    for i, key in enumerate(catalog.key.tolist()):
        shard = real_dataset / manifest["shards"][int(catalog.shard[i])]["path"]
        with open(shard, "rb") as f:
            for mod in ("s1", "s2", "lc"):
                assert bool(catalog.has[mod][i]) == (mod in EXPECTED[key])
                if mod not in EXPECTED[key]:
                    assert catalog.offset[mod][i] == -1
                    continue
                f.seek(int(catalog.offset[mod][i]))
                raw = f.read(int(catalog.size[mod][i]))
                expected, _ = read_tif(EXPECTED[key][mod])
                assert np.moveaxis(np.load(io.BytesIO(raw)), -1, 0).tobytes() == expected.tobytes()
            f.seek(int(catalog.offset["json"][i]))
            assert json.loads(f.read(int(catalog.size["json"][i])))["key"] == key
