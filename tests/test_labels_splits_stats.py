"""Labels, scene splits, subsets and mergeable statistics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from eossl.ingest.labels import patch_labels
from eossl.ingest.layout import parse_patch_file
from eossl.ingest.splits import budget_subset, non_overlapping, scene_split
from eossl.ingest.stats import BandStats


def _map(parts: dict[int, int], size: int = 100) -> np.ndarray:
    """A 1-D IGBP 'map' with the given pixel count per code."""
    values = np.concatenate([np.full(n, code, dtype=np.uint8) for code, n in parts.items()])
    assert values.size == size
    return values.reshape(10, 10)


def test_labels_majority_and_multilabel():
    lab = patch_labels(_map({1: 60, 10: 30, 17: 10}), threshold=0.1)
    assert lab.igbp == 1 and lab.igbp_simple == 1
    assert lab.igbp_multi == (1, 10, 17)  # 10 % is at the threshold: included
    assert lab.igbp_simple_multi == (1, 4, 10)
    assert lab.igbp_fractions[0] == 0.6 and lab.simple_fractions[3] == 0.3


def test_simplified_majority_merges_forest_types():
    # Two forest types of 30 % each beat 40 % grassland in the simplified scheme, not in full IGBP.
    lab = patch_labels(_map({1: 30, 4: 30, 10: 40}))
    assert lab.igbp == 10 and lab.igbp_simple == 1
    # Croplands (12) and mosaics (14) are one simplified class.
    assert patch_labels(_map({12: 35, 14: 25, 16: 40})).igbp_simple == 6


def test_invalid_codes_are_ignored_and_empty_maps_have_no_label():
    lab = patch_labels(_map({0: 50, 255: 20, 17: 30}))
    assert lab.igbp == 17 and lab.valid_fraction == 0.3 and lab.igbp_fractions[16] == 1.0
    empty = patch_labels(_map({0: 100}))
    assert empty.igbp == 0 and empty.igbp_simple == 0 and empty.igbp_multi == () and empty.valid_fraction == 0
    with pytest.raises(ValueError):
        patch_labels(_map({1: 100}), threshold=0)


def test_parse_patch_file_names():
    pid, mod = parse_patch_file("ROIs1158_spring_s1_1_p30.tif")
    assert (pid.roi, pid.season, pid.scene, pid.patch, mod) == ("ROIs1158", "spring", 1, 30, "s1")
    assert pid.key == "ROIs1158_spring_1_p30" and pid.scene_id == "ROIs1158_spring_1"
    assert parse_patch_file("ROIs1158_spring_s2_cloudy_1_p30.tif") is None
    assert parse_patch_file("ROIs1158_spring_s1_1_p30.tif.aux.xml") is None


def test_scene_split_is_by_scene_seeded_and_honours_a_list():
    scenes = [f"ROIs1158_spring_{i}" for i in range(20)]
    split = scene_split(scenes * 3, 0.2, seed=1)
    assert sorted(split) == sorted(scenes)
    assert sum(v == "test" for v in split.values()) == 4
    assert split == scene_split(list(reversed(scenes)), 0.2, seed=1)  # order of discovery does not matter
    assert split != scene_split(scenes, 0.2, seed=2)
    explicit = scene_split(scenes, 0.2, seed=1, holdout_scenes=["ROIs1158_spring_3"])
    assert [s for s, v in explicit.items() if v == "test"] == ["ROIs1158_spring_3"]
    with pytest.raises(ValueError, match="ROIs9999"):
        scene_split(scenes, 0.2, seed=1, holdout_scenes=["ROIs9999_fall_1"])
    assert scene_split(["a", "b"], 0.01, 0) != {"a": "train", "b": "train"}  # at least one test scene


def test_non_overlapping_first_come_first_served_on_the_128px_grid():
    # Patches of one scene on a 128 px (1280 m) stride: a row of 4 and a second row of 4.
    t = []
    for row in range(2):
        for col in range(4):
            t.append([10.0, 0.0, 1280.0 * col, 0.0, -10.0, -1280.0 * row])
    scenes = ["s"] * 8
    keep = non_overlapping(scenes, ["EPSG:32650"] * 8, np.array(t))
    # Row 0: keep col 0 and 2 (col 1 overlaps 0, col 3 overlaps 2); row 1 overlaps row 0 everywhere.
    assert keep.tolist() == [True, False, True, False, False, False, False, False]
    # Another scene (or CRS) never competes.
    keep2 = non_overlapping(["s", "t"], ["EPSG:32650"] * 2, np.array(t[:2]))
    assert keep2.tolist() == [True, True]


def test_budget_subsets_exact_stratified_seeded():
    rng = np.random.default_rng(0)
    labels = rng.choice([1, 2, 4, 10], size=1000, p=[0.5, 0.3, 0.15, 0.05])
    labels[:20] = 0  # unlabelled
    train = np.ones(1000, dtype=bool)
    train[900:] = False
    idx = budget_subset(labels, train, 100, seed=3)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert train[idx].all() and (labels[idx] > 0).all()
    share = np.bincount(labels[idx], minlength=11)[[1, 2, 4, 10]] / 100
    pool = labels[train & (labels > 0)]
    expected = np.bincount(pool, minlength=11)[[1, 2, 4, 10]] / len(pool)
    assert np.abs(share - expected).max() <= 0.011  # largest-remainder rounding only
    assert np.array_equal(idx, budget_subset(labels, train, 100, seed=3))
    assert not np.array_equal(idx, budget_subset(labels, train, 100, seed=4))
    with pytest.raises(ValueError, match="exceeds"):
        budget_subset(labels, train, 10_000, seed=0)
    # A class too small for its share gives the rest to the others; the total stays exact.
    small = np.array([1] * 50 + [2] * 2)
    assert len(budget_subset(small, np.ones(52, bool), 52, seed=0)) == 52


def test_band_stats_merge_equals_one_pass_and_percentiles_are_exact():
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 5000, size=(13, 16, 16), dtype=np.uint16) for _ in range(6)]
    one, a, b = BandStats.empty("s2"), BandStats.empty("s2"), BandStats.empty("s2")
    for i, p in enumerate(patches):
        one.update(p)
        (a if i % 2 else b).update(p)
    merged = a.merge(b)
    assert merged.summary() == one.summary()
    allv = np.stack(patches).transpose(1, 0, 2, 3).reshape(13, -1)
    s = one.summary()
    np.testing.assert_allclose(s["mean"], allv.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(s["std"], allv.std(axis=1), rtol=1e-6)
    for q in (1, 50, 99):
        assert s["percentiles"][f"p{q}"] == np.percentile(allv, q, axis=1, method="inverted_cdf").tolist()

    s1 = BandStats.empty("s1")
    x = rng.normal(-12, 3, size=(2, 32, 32)).astype(np.float32)
    x[0, 0, :5] = np.nan
    s1.update(x)
    assert s1.summary()["count"] == [32 * 32 - 5, 32 * 32]
    np.testing.assert_allclose(s1.summary()["mean"][0], np.nanmean(x[0].astype(np.float64)), rtol=1e-6)
    assert abs(s1.summary()["percentiles"]["p50"][1] - np.median(x[1])) <= 0.01


# The SEN12MS classification benchmark's simplified IGBP scheme (Schmitt & Wu 2021, Table 2; the
# benchmark sums the 17 IGBP probabilities into 10): IGBP code -> simplified class, written out here
# from the paper's definition, not taken from eossl.
BENCHMARK_SIMPLE = {
    **dict.fromkeys((1, 2, 3, 4, 5), 1),  # forests
    **dict.fromkeys((6, 7), 2),  # shrublands
    **dict.fromkeys((8, 9), 3),  # savannas
    10: 4,  # grasslands
    11: 5,  # wetlands
    **dict.fromkeys((12, 14), 6),  # croplands and cropland/natural vegetation mosaics
    13: 7,  # urban and built-up
    15: 8,  # permanent snow and ice
    16: 9,  # barren
    17: 10,  # water bodies
}


def test_labels_of_the_real_lc_patch_equal_the_benchmark_definition(real_source, tmp_path):
    """Hand-computed labels of ROIs1158_spring_lc_1_p30: IGBP histogram -> probabilities -> simplified
    sums; single label = argmax (first on ties), multi-label = probability >= 0.1. Compared with what
    an ingest of the real patch writes into its sample metadata."""
    import json
    import tarfile

    from conftest import REAL_LC_P30, read_tif, run_cli

    igbp = read_tif(REAL_LC_P30)[0][0]
    codes, counts = np.unique(igbp, return_counts=True)
    assert igbp.size == 256 * 256 and set(codes.tolist()) <= set(range(1, 18))
    prob = np.zeros(17)
    prob[codes - 1] = counts / igbp.size
    simple = np.zeros(10)
    for code, p in enumerate(prob, start=1):
        simple[BENCHMARK_SIMPLE[code] - 1] += p
    expected_single = int(np.argmax(simple)) + 1
    expected_multi = tuple(int(i) + 1 for i in np.flatnonzero(simple >= 0.1))
    expected_igbp = int(np.argmax(prob)) + 1
    # The patch is not a trivial one-class case: the test would catch a wrong grouping or threshold.
    assert len(codes) >= 2

    out = tmp_path / "ds"
    run_cli("ingest", str(real_source), str(out), "--required", "s1", "--formats", "wds", "--no-progress")
    manifest = json.loads((out / "manifest.json").read_text())
    written = None
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for info in tar:
                if info.name == "ROIs1158_spring_1_p30.json":
                    written = json.loads(tar.extractfile(info).read())["labels"]
    assert written is not None
    assert written["igbp_simple"] == expected_single
    assert tuple(written["igbp_simple_multi"]) == expected_multi
    assert written["igbp"] == expected_igbp
    assert written["threshold"] == 0.1
    np.testing.assert_allclose(written["simple_fractions"], simple, atol=1e-6)
    np.testing.assert_allclose(written["igbp_fractions"], prob, atol=1e-6)
