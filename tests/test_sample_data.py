"""Tests of the synthetic SEN12MS generator: layout, georeference, determinism, calibration, signal.

The calibration bounds come from the real SEN12MS patches in ingest/sample_patches (measured with rasterio,
see ``eossl.ingest.sample_data``); they are written here as numbers so the tests do not need that folder.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

from eossl.ingest.bands import IGBP_TO_SIMPLE, MODALITIES, S2, S2_LAND_BANDS, igbp_to_simple_lut
from eossl.ingest.layout import scan_source
from eossl.ingest.sample_data import SEASON_FOLDERS, write_sample_data

# Real S2 p839 (ROIs1970_fall_s2_139) band means, B1..B12 in SEN12MS order.
REAL_S2_MEANS = np.array([1599, 1349, 1213, 1258, 1422, 1619, 1758, 1777, 1936, 1075, 30, 1750, 1261])
# MODIS LCCS codes (MCD12Q1 user guide) that an LC file may hold.
LCCS_LC_CODES = {1, 2, 3, 11, 12, 13, 14, 15, 16, 21, 22, 31, 32, 41, 42, 43}
LCCS_LU_CODES = {1, 2, 3, 9, 10, 20, 25, 30, 35, 36, 40}
LCCS_SH_CODES = {1, 2, 3, 10, 20, 27, 30, 40, 50, 51}

_NAME = re.compile(
    r"^(?P<folder>ROIs\d+_(?:spring|summer|fall|winter))/(?P<mod>s1|s2|lc)_(?P<scene>\d+)/"
    r"(?P=folder)_(?P=mod)_(?P=scene)_p(?P<patch>\d+)\.tif$"
)


def _load(root: Path) -> list[dict]:
    """Every patch of a tree: its PatchId, georeference (per modality) and arrays."""
    listing = scan_source(str(root))
    assert not listing.ignored
    patches = []
    for group in listing.groups:
        rec: dict = {"pid": group.pid, "crs": {}, "transform": {}, "profile": {}}
        for mod, files in group.files.items():
            assert len(files) == 1, files
            with rasterio.open(files[0]) as ds:
                rec[mod] = ds.read()
                rec["crs"][mod] = ds.crs
                rec["transform"][mod] = ds.transform
                rec["profile"][mod] = ds.profile
        patches.append(rec)
    return patches


def _offset_px(a: dict, b: dict) -> tuple[int, int]:
    """(dx, dy) of b's upper-left corner relative to a's, in pixels (x east, y south)."""
    ta, tb = a["transform"]["lc"], b["transform"]["lc"]
    dx, dy = (tb.c - ta.c) / ta.a, (tb.f - ta.f) / ta.e
    assert abs(dx - round(dx)) < 1e-6 and abs(dy - round(dy)) < 1e-6, "patches off the scene grid"
    return round(dx), round(dy)


def _overlap(a: dict, b: dict, mod: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The pixels of a and b that cover the same ground, or None when the patches do not overlap."""
    dx, dy = _offset_px(a, b)
    if abs(dx) >= 256 or abs(dy) >= 256:
        return None
    h, w = 256 - abs(dy), 256 - abs(dx)
    ya, xa, yb, xb = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    return a[mod][:, ya : ya + h, xa : xa + w], b[mod][:, yb : yb + h, xb : xb + w]


@pytest.fixture(scope="module")
def dataset(module_tmp) -> list[dict]:
    """40 patches, 10 scenes over all four seasons: the dataset the calibration and signal tests use."""
    root = module_tmp("sample40")
    write_sample_data(root, 40, seed=0)
    return _load(root)


def test_layout_and_names(tmp_path):
    files = write_sample_data(tmp_path, 10, seed=1)

    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == on_disk
    assert len(on_disk) == 30
    for rel in on_disk:
        assert _NAME.match(rel), rel
    assert {rel.split("/")[0] for rel in on_disk} == set(SEASON_FOLDERS[:3])  # 3 scenes, 3 seasons

    listing = scan_source(str(tmp_path))
    assert len(listing.groups) == 10 and not listing.ignored
    assert all(sorted(g.files) == ["lc", "s1", "s2"] for g in listing.groups)
    by_scene = collections.defaultdict(list)
    for g in listing.groups:
        by_scene[g.pid.scene_id].append(g.pid.patch)
    assert sorted(len(v) for v in by_scene.values()) == [2, 4, 4]  # 4 per scene, the last gets the rest
    for numbers in by_scene.values():  # consecutive patch numbers of one scene grid
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_seasons_and_scene_numbers(tmp_path):
    write_sample_data(tmp_path / "a", 5, seed=2, patches_per_scene=1)
    pids = [g.pid for g in scan_source(str(tmp_path / "a")).groups]
    assert {p.roi_season for p in pids} == set(SEASON_FOLDERS)
    # scene numbers restart in every season folder, as in SEN12MS
    assert sorted((p.roi_season, p.scene) for p in pids) == sorted(
        [
            ("ROIs1158_spring", 1),
            ("ROIs1158_spring", 2),
            ("ROIs1868_summer", 1),
            ("ROIs1970_fall", 1),
            ("ROIs2017_winter", 1),
        ]
    )

    write_sample_data(tmp_path / "b", 6, seed=2, seasons=1, patches_per_scene=2)
    pids = [g.pid for g in scan_source(str(tmp_path / "b")).groups]
    assert {p.roi_season for p in pids} == {"ROIs1158_spring"}
    assert sorted({p.scene for p in pids}) == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patches": 0},
        {"patches": 3, "seed": -1},
        {"patches": 3, "seasons": 0},
        {"patches": 3, "seasons": 5},
        {"patches": 3, "patches_per_scene": 0},
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_sample_data(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_bands_dtypes_and_georeference(dataset):
    for rec in dataset:
        for name, mod in MODALITIES.items():
            assert rec[name].shape == mod.shape_chw, (rec["pid"], name)
            assert rec[name].dtype == np.dtype(mod.dtype), (rec["pid"], name)
            profile = rec["profile"][name]
            assert profile["driver"] == "GTiff" and profile.get("compress") is None
        assert rec["crs"]["s1"] == rec["crs"]["s2"] == rec["crs"]["lc"]
        assert rec["transform"]["s1"] == rec["transform"]["s2"] == rec["transform"]["lc"]
        t = rec["transform"]["lc"]
        assert (t.a, t.b, t.d, t.e) == (10.0, 0.0, 0.0, -10.0)  # north-up, 10 m pixels
        epsg = rec["crs"]["lc"].to_epsg()
        assert 32601 <= epsg <= 32660 or 32701 <= epsg <= 32760, epsg  # WGS 84 / UTM

    # within a scene: one CRS, corners on the 128 px grid, patch numbers row-major over it
    scenes = collections.defaultdict(list)
    for rec in dataset:
        scenes[rec["pid"].scene_id].append(rec)
    assert len(scenes) == 10
    for recs in scenes.values():
        recs.sort(key=lambda r: r["pid"].patch)
        assert len({r["crs"]["lc"].to_epsg() for r in recs}) == 1
        for a, b in zip(recs, recs[1:], strict=False):
            dx, dy = _offset_px(a, b)
            assert (dx, dy) == (128, 0) or (dy == 128 and dx < 0), (a["pid"], b["pid"], dx, dy)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = write_sample_data(tmp_path / "a", 3, seed=5)
    b = write_sample_data(tmp_path / "b", 3, seed=5)
    c = write_sample_data(tmp_path / "c", 3, seed=6)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa
    for pa, pc in zip(a, c, strict=True):  # every file of every patch differs with another seed
        with rasterio.open(pa) as da, rasterio.open(pc) as dc:
            assert da.transform != dc.transform and not np.array_equal(da.read(), dc.read()), pa


def test_values_calibrated_to_real_patches(dataset):
    s1 = np.stack([r["s1"] for r in dataset]).astype(np.float64)  # N x 2 x 256 x 256, dB
    s2 = np.stack([r["s2"] for r in dataset]).astype(np.float64)  # N x 13 x 256 x 256
    s2_means = s2.mean(axis=(0, 2, 3))
    land = [S2.bands.index(b) for b in S2_LAND_BANDS]
    assert np.all((s2_means[land] > 100) & (s2_means[land] < 6000)), s2_means
    # within a factor of 2 of the real patch per band, cirrus B10 included (real mean 30, not ~1000)
    ratio = s2_means / REAL_S2_MEANS
    assert np.all((ratio > 0.5) & (ratio < 2.0)), dict(zip(S2.bands, ratio.round(2), strict=True))
    assert s2.min() >= 1 and s2.max() < 12000

    vv, vh = s1[:, 0], s1[:, 1]
    assert -25 < vv.mean() < 0 and vh.mean() < vv.mean() - 3, (vv.mean(), vh.mean())
    assert vv.max() <= 0 and vh.max() <= 0  # clipped at 0 dB like SEN12MS
    assert vv.min() > -50 and np.isfinite(s1).all()

    # speckle: real within-class VV std 1.6-1.95 dB, lag-1 autocorrelation 0.79-0.91
    def lag1(x: np.ndarray) -> float:
        z = x - x.mean()
        return float((z[:, 1:] * z[:, :-1]).mean() / z.var())

    stds, acs = [], []
    for rec in dataset:
        igbp = rec["lc"][0]
        for y in range(0, 256, 64):
            for x in range(0, 256, 64):
                win = igbp[y : y + 64, x : x + 64]
                if np.all(win == win[0, 0]) and win[0, 0] in (4, 5, 8, 9, 10):  # natural, one class
                    stds.append(rec["s1"][0, y : y + 64, x : x + 64].std())
    acs = [lag1(r["s1"][0].astype(np.float64)) for r in dataset]
    assert len(stds) > 20
    assert 1.0 < np.median(stds) < 3.0, np.median(stds)
    assert 0.6 < np.median(acs) < 0.95, np.median(acs)
    b2 = S2.bands.index("B2")
    ac_b2 = np.median([lag1(r["s2"][b2].astype(np.float64)) for r in dataset])
    assert 0.85 < ac_b2 < 0.995, ac_b2  # real 10 m bands 0.89-0.95: textured, not pixel noise


def test_land_cover_is_blocky_modis_with_consistent_lccs(dataset):
    lc = np.stack([r["lc"] for r in dataset])  # N x 4 x 256 x 256
    igbp = lc[:, 0]
    assert set(np.unique(igbp)) <= set(IGBP_TO_SIMPLE)
    # 500 m MODIS cells resampled to 10 m: large regions, not per-pixel noise
    assert (igbp[:, :, 1:] == igbp[:, :, :-1]).mean() > 0.97
    assert (igbp[:, 1:, :] == igbp[:, :-1, :]).mean() > 0.97
    packed = np.unique(np.ascontiguousarray(lc.transpose(0, 2, 3, 1)).view(np.uint32))  # 4 layers per pixel
    lccs_of = {}
    for code, lc_lc, lu, sh in packed.astype("<u4").view(np.uint8).reshape(-1, 4).tolist():
        assert code not in lccs_of, f"IGBP {code} maps to {lccs_of[code]} and {(lc_lc, lu, sh)}"
        lccs_of[code] = (lc_lc, lu, sh)
        assert lc_lc in LCCS_LC_CODES and lu in LCCS_LU_CODES and sh in LCCS_SH_CODES, (code, lc_lc, lu, sh)
    # pairs seen in the real patch ROIs1158_spring_lc_1_p30
    real = {4: (14, 10, 10), 5: (16, 10, 10), 8: (21, 20, 20), 9: (22, 20, 20)}
    for code, triple in real.items():
        assert lccs_of.get(code, triple) == triple, code
    assert lccs_of[17] == (3, 3, 3) and lccs_of[15] == (2, 2, 2)


def test_overlapping_patches_show_the_same_ground(tmp_path):
    # one scene of 12 consecutive patches spans at least two grid rows: horizontal, vertical and
    # diagonal neighbours
    write_sample_data(tmp_path, 12, seed=3, patches_per_scene=12)
    recs = _load(tmp_path)
    assert len({r["pid"].scene_id for r in recs}) == 1
    offsets = set()
    for i, a in enumerate(recs):
        for b in recs[i + 1 :]:
            lc = _overlap(a, b, "lc")
            if lc is None:
                continue
            offsets.add(_offset_px(a, b))
            assert np.array_equal(*lc), (a["pid"], b["pid"])
            s2a, s2b = (x[S2.bands.index("B8")].astype(np.float64) for x in _overlap(a, b, "s2"))
            assert np.corrcoef(s2a.ravel(), s2b.ravel())[0, 1] > 0.9  # same ground ...
            assert not np.array_equal(s2a, s2b)  # ... seen with independent sensor noise
            s1a, s1b = _overlap(a, b, "s1")
            assert abs(s1a.mean() - s1b.mean()) < 1.0
    assert (128, 0) in offsets and any(dy == 128 for _, dy in offsets), offsets


def test_classes_differ_in_both_sensors(dataset):
    vv = np.concatenate([r["s1"][0].ravel() for r in dataset]).astype(np.float64)
    s2 = np.concatenate([r["s2"].reshape(13, -1) for r in dataset], axis=1).astype(np.float64)
    igbp = np.concatenate([r["lc"][0].ravel() for r in dataset])
    b4, b8, b3, b11 = (s2[S2.bands.index(b)] for b in ("B4", "B8", "B3", "B11"))
    forest, water, urban, snow = np.isin(igbp, (1, 2, 3, 4, 5)), igbp == 17, igbp == 13, igbp == 15
    assert forest.sum() > 10_000 and water.sum() > 10_000 and urban.sum() > 10_000 and snow.sum() > 10_000
    assert vv[forest].mean() - vv[water].mean() > 6  # calm water is dark in SAR
    assert vv[urban].mean() - vv[forest].mean() > 3  # double bounce
    assert b8[forest].mean() > 3 * b8[water].mean()  # water absorbs NIR, leaves reflect it
    assert b8[forest].mean() > 2 * b4[forest].mean()  # red edge of vegetation
    assert b3[snow].mean() > 3 * b11[snow].mean()  # snow: bright visible, dark SWIR


def test_labels_vary_and_are_learnable(dataset):
    lut = igbp_to_simple_lut()
    majority = [lut[np.bincount(r["lc"][0].ravel()).argmax()] for r in dataset]
    assert len(set(majority)) >= 4, collections.Counter(majority)
    present = [
        int((np.bincount(lut[r["lc"][0]].ravel(), minlength=11)[1:] > 0.01 * 65536).sum()) for r in dataset
    ]
    assert 1 <= np.median(present) <= 3 and sum(n >= 2 for n in present) >= len(dataset) // 4, present

    # nearest class centroid, fitted on even patches, scored on odd ones (chance ~0.2)
    def nearest_centroid_accuracy(features) -> float:
        xs, ys = zip(*(features(r) for r in dataset), strict=True)
        x_fit, y_fit = np.concatenate(xs[0::2]), np.concatenate(ys[0::2])
        x_val, y_val = np.concatenate(xs[1::2]), np.concatenate(ys[1::2])
        classes = np.unique(y_fit)
        centroids = np.stack([x_fit[y_fit == c].mean(axis=0) for c in classes])
        scale = x_fit.std(axis=0)
        dist = (((x_val[:, None] - centroids[None]) / scale) ** 2).sum(axis=-1)
        return float((classes[dist.argmin(axis=1)] == y_val).mean())

    land = [S2.bands.index(b) for b in S2_LAND_BANDS]

    def s2_pixels(r):  # log reflectance of every 8th pixel
        return np.log(r["s2"][land, ::8, ::8].reshape(len(land), -1).T.astype(np.float64)), lut[
            r["lc"][0, ::8, ::8].ravel()
        ]

    def s1_blocks(r):  # VV, VH averaged over 8x8 blocks (speckle filter), single-class blocks only
        x = r["s1"].reshape(2, 32, 8, 32, 8).mean(axis=(2, 4)).reshape(2, -1).T
        lab = r["lc"][0].reshape(32, 8, 32, 8).transpose(0, 2, 1, 3).reshape(32 * 32, 64)
        pure = (lab == lab[:, :1]).all(axis=1)
        return x[pure], lut[lab[pure, 0]]

    assert nearest_centroid_accuracy(s2_pixels) > 0.5
    assert nearest_centroid_accuracy(s1_blocks) > 0.35


def test_fifty_patches_are_written_uncompressed(tmp_path):
    files = write_sample_data(tmp_path, 50, seed=4)
    assert len(files) == 150 and all(isinstance(f, Path) for f in files)
    for f in files:  # uncompressed like SEN12MS: the file holds at least the raw array
        mod = MODALITIES[_NAME.match(f.relative_to(tmp_path).as_posix())["mod"]]
        assert mod.nbytes <= f.stat().st_size < mod.nbytes + 16_384, f
