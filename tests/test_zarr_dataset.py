"""ZarrPatchDataset on datasets written by the real CLI: values against a float64 reference, subsets,
labels, NaN handling, exclusions, DataLoader workers and S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from eossl.ingest.bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES
from eossl.streaming.inputs import InputSpec
from eossl.streaming.zarr_dataset import ZarrPatchDataset

from conftest import complete_triplet, run_cli, sen12ms_path, spoil_s1
from servers import upload_tree

# Spelled out here, not taken from eossl, so a band-table or band-selection bug cannot cancel out.
LAND = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
ALL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


@pytest.fixture(scope="module")
def dataset(synthetic_source, module_tmp) -> Path:
    ds = module_tmp("zarr_dataset") / "ds"
    run_cli(
        "ingest",
        str(synthetic_source),
        str(ds),
        "--shard-size",
        "16MB",
        "--budgets",
        "4",
        "--holdout-fraction",
        "0.3",
        "--no-progress",
    )
    return ds


@pytest.fixture(scope="module")
def group(dataset) -> zarr.Group:
    return zarr.open_group(str(dataset / "data.zarr"), mode="r")


def reference_x(
    dataset: Path,
    row: int,
    sensors: tuple[str, ...],
    s2_bands: tuple[str, ...],
    clip: tuple[float, float] | None,
) -> np.ndarray:
    """x in float64 straight from the Zarr arrays and the manifest's statistics."""
    g = zarr.open_group(str(dataset / "data.zarr"), mode="r")
    stats = json.loads((dataset / "manifest.json").read_text())["stats"]
    parts = []
    for sensor in sensors:
        if sensor == "s1":
            v = g["s1"][row].astype(np.float64)
            mean, std = np.array(stats["s1"]["mean"]), np.array(stats["s1"]["std"])
            if clip:
                v = np.clip(v, *clip)
        else:
            idx = [list(g["s2"].attrs["bands"]).index(b) for b in s2_bands]
            v = g["s2"][row][idx].astype(np.float64)
            mean, std = np.array(stats["s2"]["mean"])[idx], np.array(stats["s2"]["std"])[idx]
        parts.append((v - mean[:, None, None]) / std[:, None, None])
    return np.concatenate(parts)


@pytest.mark.parametrize(
    ("sensors", "bands", "channels"),
    [
        ("s1", "land", 2),
        ("s2", "land", 10),
        ("s2", "all", 13),
        ("s1s2", "land", 12),
        ("s1s2", "all", 15),
    ],
)
def test_values_equal_float64_reference(dataset, sensors, bands, channels):
    inputs = InputSpec.parse(sensors, bands)
    ds = ZarrPatchDataset(str(dataset), inputs)
    names = LAND if bands == "land" else ALL
    for row in (0, 9, 23):
        x = ds[row]["x"]
        assert x.dtype == torch.float32 and x.shape == (channels, 256, 256)
        ref = reference_x(dataset, row, inputs.sensors, names, (-25.0, 0.0))
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-5)


def test_s1_clip_applies_and_can_be_switched_off(dataset, group):
    row = int(np.argmin([np.nanmin(group["s1"][r]) for r in range(4)]))
    assert np.nanmin(group["s1"][row]) < -25  # the synthetic S1 reaches below the clip: clipping shows
    clipped = ZarrPatchDataset(str(dataset), InputSpec(("s1",), s1_clip=(-25.0, 0.0)))[row]["x"].numpy()
    raw = ZarrPatchDataset(str(dataset), InputSpec(("s1",), s1_clip=None))[row]["x"].numpy()
    ref_clipped = reference_x(dataset, row, ("s1",), (), (-25.0, 0.0))
    np.testing.assert_allclose(clipped, ref_clipped, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(raw, reference_x(dataset, row, ("s1",), (), None), rtol=1e-6, atol=1e-5)
    assert not np.allclose(clipped, raw)


def test_subset_names_resolve_to_subsets_json(dataset, group):
    subsets = json.loads((dataset / "subsets.json").read_text())
    inputs = InputSpec()
    for name in ("train", "test", "non_overlapping"):
        ds = ZarrPatchDataset(str(dataset), inputs, rows=name)
        assert ds.rows.tolist() == subsets[name] and len(ds) == len(subsets[name])
        assert [ds[i]["row"] for i in range(len(ds))] == subsets[name]
    test = ZarrPatchDataset(str(dataset), inputs, rows="test")
    split = group["split"][:]
    assert len(test) > 0 and all(split[r] == "test" for r in test.rows)
    assert sum(split[r] == "test" for r in range(len(split))) == len(test)
    for name, rows in subsets["budgets"].items():
        budget = ZarrPatchDataset(str(dataset), inputs, rows=name)
        assert budget.rows.tolist() == rows and len(budget) == 4
    assert len(ZarrPatchDataset(str(dataset), inputs)) == 24
    with pytest.raises(ValueError, match="budget_4_seed0") as err:
        ZarrPatchDataset(str(dataset), inputs, rows="budget_1024_seed0")
    assert "test" in str(err.value) and "non_overlapping" in str(err.value)


def test_explicit_rows_keep_order_and_keys(dataset, group):
    ds = ZarrPatchDataset(str(dataset), InputSpec(("s2",)), rows=[17, 2, 5])
    keys = group["key"][:]
    assert [(ds[i]["row"], ds[i]["key"]) for i in range(3)] == [(r, str(keys[r])) for r in (17, 2, 5)]
    np.testing.assert_allclose(
        ds[0]["x"].numpy(), reference_x(dataset, 17, ("s2",), LAND, None), rtol=1e-6, atol=1e-5
    )
    with pytest.raises(ValueError, match="out of range"):
        ZarrPatchDataset(str(dataset), InputSpec(), rows=[0, 24])
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize(
    ("scheme", "classes"), [("igbp_simple", IGBP_SIMPLE_CLASSES), ("igbp", IGBP_CLASSES)]
)
def test_labels_single_and_multi(dataset, group, scheme, classes):
    codes = group[f"label_{scheme}"][:].astype(np.int64)
    multi = group[f"multilabel_{scheme}"][:]
    assert len(np.unique(codes)) > 2  # labels vary, so an off-by-one or a row mix-up shows
    single = ZarrPatchDataset(str(dataset), InputSpec(), label=scheme)
    assert single.classes == list(classes)
    assert single.labels().dtype == np.int64 and np.array_equal(single.labels(), codes[single.rows] - 1)
    for i in (0, 11, 23):
        y = single[i]["y"]
        assert y.dtype == torch.int64 and y.shape == () and int(y) == codes[single.rows[i]] - 1
    ml = ZarrPatchDataset(str(dataset), InputSpec(), label=scheme, multilabel=True)
    assert ml.labels().shape == (24, len(classes)) and ml.labels().dtype == np.float32
    assert np.array_equal(ml.labels(), multi[ml.rows].astype(np.float32))
    for i in (0, 11, 23):
        y = ml[i]["y"]
        assert y.dtype == torch.float32
        assert torch.equal(y, torch.from_numpy(multi[ml.rows[i]].astype(np.float32)))


def test_with_lc_returns_the_stored_map(dataset, group):
    ds = ZarrPatchDataset(str(dataset), InputSpec(), rows="test", with_lc=True)
    lc = ds[2]["lc"]
    assert lc.dtype == torch.uint8 and lc.shape == (4, 256, 256)
    assert np.array_equal(lc.numpy(), group["lc"][int(ds.rows[2])])
    assert "lc" not in ZarrPatchDataset(str(dataset), InputSpec())[0]


@pytest.mark.slow
def test_nan_and_inf_s1_pixels_give_finite_x(tmp_path):
    src, out = tmp_path / "src", tmp_path / "ds"
    complete_triplet(src, scene=1, patch=1)
    complete_triplet(src, scene=2, patch=1)
    spoil_s1(sen12ms_path(src, "s1", scene=1, patch=1))
    run_cli("ingest", str(src), str(out), "--max-s1-invalid", "0.5", "--no-progress", "--shard-size", "16MB")
    g = zarr.open_group(str(out / "data.zarr"), mode="r")
    row = [str(k) for k in g["key"][:]].index("ROIs1970_fall_1_p1")
    stored = g["s1"][row]
    assert (~np.isfinite(stored)).sum() == 12 and g["s1_invalid_pixels"][row] == 12  # kept as stored
    bad = ~np.isfinite(stored)
    stats = json.loads((out / "manifest.json").read_text())["stats"]["s1"]
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    for clip in ((-25.0, 0.0), None):
        for sensors in ("s1", "s1s2"):
            ds = ZarrPatchDataset(str(out), InputSpec.parse(sensors, s1_clip=clip))
            x = ds[row]["x"].numpy()
            assert np.isfinite(x).all()
            # Replaced by the band mean (clipped into range): standardised, (clip(mean) - mean) / std.
            fill = np.clip(mean, *clip) if clip else mean
            expected = ((fill - mean) / std)[:, None, None] * np.ones_like(stored, dtype=np.float64)
            np.testing.assert_allclose(x[:2][bad], expected[bad], atol=1e-6)
            good = reference_x(out, row, ("s1",), (), clip)
            np.testing.assert_allclose(x[:2][~bad], good[~bad], rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_samples_lacking_a_sensor_or_label_are_excluded(real_source, tmp_path):
    # The shipped real patches: ROIs1158_spring_1_p30 has s1+lc (no s2), ROIs1970_fall_139_p839 s1+s2 (no lc).
    out = tmp_path / "ds"
    run_cli("ingest", str(real_source), str(out), "--required", "s1", "--no-progress", "--shard-size", "16MB")
    g = zarr.open_group(str(out / "data.zarr"), mode="r")
    assert [str(k) for k in g["key"][:]] == ["ROIs1158_spring_1_p30", "ROIs1970_fall_139_p839"]
    assert g["has_s2"][:].tolist() == [False, True]

    s2 = ZarrPatchDataset(str(out), InputSpec(("s2",)), label=None)
    assert s2.rows.tolist() == [1] and s2.excluded == {"missing s2": 1} and "y" not in s2[0]
    assert s2[0]["key"] == "ROIs1970_fall_139_p839" and np.isfinite(s2[0]["x"].numpy()).all()
    s1 = ZarrPatchDataset(str(out), InputSpec(("s1",)), label=None)
    assert s1.rows.tolist() == [0, 1] and s1.excluded == {}
    labelled = ZarrPatchDataset(str(out), InputSpec(("s1",)))
    assert labelled.rows.tolist() == [0] and labelled.excluded == {"no label": 1}
    multi = ZarrPatchDataset(str(out), InputSpec(("s1",)), label="igbp", multilabel=True)
    assert multi.rows.tolist() == [0] and multi.labels().shape == (1, 17)
    assert np.array_equal(multi.labels()[0], g["multilabel_igbp"][0]) and multi.labels().sum() > 0
    both = ZarrPatchDataset(str(out), InputSpec(("s1", "s2")))
    assert len(both) == 0 and both.excluded == {"missing s2": 1, "no label": 1}
    with_lc = ZarrPatchDataset(str(out), InputSpec(("s1",)), label=None, with_lc=True)
    assert with_lc.rows.tolist() == [0] and with_lc.excluded == {"missing lc": 1}


def _stack(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("x", "y")}
    return out | {"row": [it["row"] for it in items]}


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_match_direct_indexing(dataset, context):
    ds = ZarrPatchDataset(str(dataset), InputSpec(), rows="train")
    direct = _stack([ds[i] for i in range(len(ds))])  # the parent holds an open handle before the fork
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=context, shuffle=False)
    batches = list(loader)
    assert len(batches) == 4  # 16 train rows
    assert torch.equal(torch.cat([b["x"] for b in batches]), direct["x"])
    assert torch.equal(torch.cat([b["y"] for b in batches]), direct["y"])
    assert torch.cat([b["row"] for b in batches]).tolist() == direct["row"] == ds.rows.tolist()
    assert ds._pid is not None and ds.__getstate__()["_group"] is None


@pytest.mark.slow
def test_s3_items_equal_local(dataset, s3_endpoint):
    upload_tree(dataset, "s3://eossl-zarr-dataset/ds")
    url = "s3://eossl-zarr-dataset/ds"
    for kwargs in ({"rows": "budget_4_seed1", "multilabel": True, "with_lc": True}, {"rows": [3, 20]}):
        local = ZarrPatchDataset(str(dataset), InputSpec(), **kwargs)
        remote = ZarrPatchDataset(url, InputSpec(), **kwargs)
        assert remote.rows.tolist() == local.rows.tolist() and remote.classes == local.classes
        assert np.array_equal(remote.labels(), local.labels())
        for i in range(len(local)):
            a, b = local[i], remote[i]
            assert a.keys() == b.keys() and a["key"] == b["key"] and a["row"] == b["row"]
            assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # Forked workers reading S3 after the parent opened its handle (s3fs instances are not fork-safe).
    loader = DataLoader(remote, batch_size=1, num_workers=2, multiprocessing_context="fork")
    expected = torch.stack([local[i]["x"] for i in range(len(local))])
    assert torch.equal(torch.cat([b["x"] for b in loader]), expected)
