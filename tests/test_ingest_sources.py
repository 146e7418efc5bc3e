"""Sources other than SEN12MS: detection, resampling onto 10 m, BigEarthNet-MM and SSL4EO-S12 end to end.

The trees are written by the real sample-data writers in the sources' real layouts (names, dtypes, band
resolutions, metadata files and label spellings); each is ingested, verified and trained on for two steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from eossl.ingest.bandfiles import read_modality, upsample_nearest
from eossl.ingest.bigearthnet import BEN_S2, CORINE_LABELS, ben19_codes
from eossl.ingest.config import IngestConfig, SplitOptions
from eossl.ingest.format import decode_member
from eossl.ingest.integrity import missing_dataset_reason
from eossl.ingest.layout import NoPatchesError
from eossl.ingest.read import _BadFile
from eossl.ingest.sample_data import write_sample_data
from eossl.ingest.sample_sources import BEN_S2_MEANS, write_bigearthnet_sample, write_ssl4eo_sample
from eossl.ingest.sources import AmbiguousSourceError, detect_source
from eossl.ingest.storage import DatasetRoot
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest
from eossl.ingest.zarr_store import iter_shard_samples

from conftest import TINY_MOCO

SPLIT = SplitOptions(holdout_fraction=0.34, budgets=(2,), budget_seeds=(0,))


@pytest.fixture(scope="module")
def ben_tree(module_tmp) -> Path:
    out = module_tmp("ben") / "src"
    write_bigearthnet_sample(out, patches=9, seed=3, patches_per_product=3)
    return out


@pytest.fixture(scope="module")
def ben_dataset(ben_tree, module_tmp) -> Path:
    out = module_tmp("ben") / "ds"
    lists = (
        str(ben_tree / "patches_with_cloud_and_shadow.csv"),
        str(ben_tree / "patches_with_seasonal_snow.csv"),
    )
    cfg = IngestConfig(
        source=str(ben_tree), dataset=str(out), workers=1, progress=False, split=SPLIT, reject_lists=lists
    )
    summary = run_ingest(cfg)
    assert summary.complete and summary.found == 9
    return out


@pytest.fixture(scope="module")
def ssl_tree(module_tmp) -> Path:
    out = module_tmp("ssl") / "src"
    write_ssl4eo_sample(out, locations=2, seed=1)
    return out


def test_sample_data_writes_each_layout(tmp_path):
    from eossl.launch.cli import main

    for layout, patches in (("bigearthnet-mm", "2"), ("ssl4eo-s12", "1")):
        out = tmp_path / layout
        assert main(["sample-data", str(out), "--layout", layout, "--patches", patches]) == 0
        assert detect_source(str(out)).name == layout


def test_detection_names_the_source_and_refuses_a_mixed_tree(ben_tree, ssl_tree, tmp_path):
    assert detect_source(str(ben_tree)).name == "bigearthnet-mm"
    assert detect_source(str(ssl_tree)).name == "ssl4eo-s12"
    write_sample_data(tmp_path / "sen", patches=1)
    assert detect_source(str(tmp_path / "sen")).name == "sen12ms"
    mixed = tmp_path / "sen" / "extra"
    write_bigearthnet_sample(mixed, patches=1)
    with pytest.raises(AmbiguousSourceError, match="sen12ms, bigearthnet-mm.*--source-format"):
        detect_source(str(tmp_path / "sen"))


def test_a_tree_of_no_layout_is_refused_naming_every_layout_and_a_source_is_not_a_dataset(ben_tree, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    cfg = IngestConfig(source=str(tmp_path / "src"), dataset=str(tmp_path / "ds"), workers=1, progress=False)
    with pytest.raises(NoPatchesError) as err:
        run_ingest(cfg)
    message = str(err.value)
    assert "no SEN12MS patches found" in message and "nor BigEarthNet-MM (S2 patch folders" in message
    assert "nor SSL4EO-S12 (s1/<7-digit location>" in message and "--source-format" in message
    assert not (tmp_path / "ds").exists()
    reason = missing_dataset_reason(DatasetRoot(str(ben_tree)))
    assert "looks like a BigEarthNet-MM source tree" in reason and "eossl ingest" in reason


def test_nearest_upsampling_is_block_replication_and_10m_bands_stay_exact(ben_tree):
    band = np.arange(6, dtype=np.uint16).reshape(2, 3)
    up = upsample_nearest(band, 3)
    assert up.shape == (6, 9) and np.array_equal(up[::3, ::3], band)
    assert all(np.array_equal(up[i::3, j::3], band) for i in range(3) for j in range(3))

    folder = next((ben_tree / "BigEarthNet-v1.0").iterdir())
    files = {
        b: str(folder / f"{folder.name}_{'B8A' if b == 'B8A' else f'B{int(b[1:]):02d}'}.tif")
        for b in BEN_S2.bands
    }
    chw, _, transform, invalid = read_modality(files, BEN_S2)
    assert chw.shape == (12, 120, 120) and chw.dtype == np.uint16 and not invalid.any()
    for b, res in (("B2", 1), ("B5", 2), ("B1", 6)):  # 10, 20 and 60 m
        with rasterio.open(files[b]) as ds:
            stored = ds.read(1)
            assert ds.shape == (120 // res, 120 // res)
        c = BEN_S2.bands.index(b)
        assert np.array_equal(chw[c][::res, ::res], stored)
        assert np.array_equal(chw[c], upsample_nearest(stored, res))
    assert transform[0] == 10.0


def test_a_band_off_the_10m_grid_is_refused_naming_the_file(ben_tree, tmp_path):
    folder = next((ben_tree / "BigEarthNet-v1.0").iterdir())
    files = {}
    for b in BEN_S2.bands:
        name = f"{folder.name}_{'B8A' if b == 'B8A' else f'B{int(b[1:]):02d}'}.tif"
        files[b] = str(folder / name)
    with rasterio.open(files["B5"]) as ds:
        data, profile = ds.read(), ds.profile
    t = profile["transform"]
    profile["transform"] = Affine(t.a, t.b, t.c + 10.0, t.d, t.e, t.f)  # half a 20 m pixel east
    shifted = tmp_path / "B05.tif"
    with rasterio.open(shifted, "w", **profile) as dst:
        dst.write(data)
    files["B5"] = str(shifted)
    with pytest.raises(_BadFile) as err:
        read_modality(files, BEN_S2)
    assert err.value.path == str(shifted) and "same corner" in err.value.reason


def test_corine_labels_map_to_the_19_class_nomenclature():
    assert len(CORINE_LABELS) == 43
    codes, unmapped = ben19_codes(
        ["Discontinuous urban fabric", "Rice fields", "Olive groves", "Sparsely vegetated areas", "Airports"]
    )
    assert codes == (1, 3, 4, 12) and unmapped == ("Airports",)
    assert ben19_codes(["Salines", "Estuaries", "Peatbogs"])[0] == (16, 17, 19)
    with pytest.raises(ValueError, match="Broadleaved forest"):
        ben19_codes(["Broadleaved forest"])  # not the metadata's spelling


def test_bigearthnet_ingests_verifies_and_records_its_source(ben_tree, ben_dataset):
    manifest = json.loads((ben_dataset / "manifest.json").read_text())
    src = manifest["source"]
    assert src["format"] == "bigearthnet-mm" and src["patch_size"] == 120
    assert src["modalities"]["s2"]["bands"] == list(BEN_S2.bands) and "lc" not in src["modalities"]
    assert len(src["label_schemes"]["bigearthnet19"]) == 19
    assert set(src["reject_lists"]["lists"]) == {
        "patches_with_cloud_and_shadow.csv",
        "patches_with_seasonal_snow.csv",
    }
    c = manifest["counts"]
    assert (c["patches_found"], c["samples_written"], c["rejected"]) == (9, 7, 2)
    assert "with_lc" not in c and manifest["stats"]["s2"]["bands"] == list(BEN_S2.bands)
    # The synthetic tree is calibrated on BigEarthNet's published S2 band means (9 patches: within 40 %).
    ratios = np.array(manifest["stats"]["s2"]["mean"]) / np.array(BEN_S2_MEANS)
    assert np.all((ratios > 0.6) & (ratios < 1.4)), ratios.round(2)
    rejects = [json.loads(line) for line in (ben_dataset / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons[0].startswith("covered by clouds or cloud shadows (listed in patches_with_cloud")
    assert reasons[1].startswith("covered by seasonal snow (listed in patches_with_seasonal_snow.csv)")
    assert verify(str(ben_dataset), deep=True) == []

    # A sample holds the GeoTIFFs (10 m band exact, S1 bit-exact) and the mapped CORINE labels.
    out = DatasetRoot(str(ben_dataset))
    key, members = next(iter_shard_samples(out, manifest["shards"][0]["path"]))
    meta = json.loads(members["json"])
    s2 = decode_member(members["s2.npy"])
    s1 = decode_member(members["s1.npy"])
    folder = ben_tree / "BigEarthNet-v1.0" / key
    with rasterio.open(folder / f"{key}_B04.tif") as ds:
        assert np.array_equal(s2[BEN_S2.bands.index("B4")], ds.read(1))
    s1_name = meta["files"]["s1:VV"].rsplit("/", 1)[-1][: -len("_VV.tif")]
    with rasterio.open(ben_tree / "BigEarthNet-S1-v1.0" / s1_name / f"{s1_name}_VV.tif") as ds:
        assert s1[0].tobytes() == ds.read(1).tobytes()
    labels = json.loads((folder / f"{key}_labels_metadata.json").read_text())["labels"]
    assert meta["labels"]["corine"] == labels
    assert tuple(meta["labels"]["bigearthnet19_multi"]) == ben19_codes(labels)[0]
    assert meta["product"] == key.rsplit("_", 2)[0] and meta["scene_id"] == meta["product"]
    assert meta["grids"]["s1"] == meta["grids"]["s2"] == {"crs": meta["crs"], "transform": meta["transform"]}

    import zarr

    group = zarr.open_group(str(ben_dataset / "data.zarr"), mode="r")
    assert group["s2"].shape == (7, 12, 120, 120) and group.attrs["patch_size"] == 120
    multi = group["multilabel_bigearthnet19"][:]
    assert multi.shape == (7, 19) and multi.any(axis=1).all()


@pytest.fixture(scope="module")
def mlflow_uri(module_tmp) -> str:
    """One SQLite MLflow store for the module's runs: creating a store's tables is most of a tiny run."""
    return f"sqlite:///{module_tmp('mlflow') / 'mlflow.db'}"


def _train_two_steps(data: Path, tmp_path: Path, monkeypatch, mlflow_uri: str) -> None:
    from eossl.train.config import load_config
    from eossl.train.loop import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    values = {**TINY_MOCO, "batch_size": "4", "data": str(data), "out": str(tmp_path / "run")}
    cfg = load_config("moco", None, {**values, "max_steps": "2", "log_every": "1", "ckpt_every": "0"})
    result = train(cfg, resume=False)
    assert result.steps == 2 and np.isfinite(result.final_loss)


def test_bigearthnet_trains_two_steps(ben_dataset, tmp_path, monkeypatch, mlflow_uri):
    _train_two_steps(ben_dataset, tmp_path, monkeypatch, mlflow_uri)


def test_ssl4eo_pairs_seasons_keeps_locations_in_one_split_and_trains(
    ssl_tree, tmp_path, monkeypatch, mlflow_uri
):
    out = tmp_path / "ds"
    cfg = IngestConfig(source=str(ssl_tree), dataset=str(out), workers=1, progress=False, split=SPLIT)
    summary = run_ingest(cfg)
    assert (summary.found, summary.written, summary.rejected) == (8, 7, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "ssl4eo-s12" and manifest["source"]["pretraining_only"]
    assert manifest["source"]["patch_size"] == 264 and len(manifest["stats"]["s2"]["bands"]) == 13
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["key"] == "0000002_3" and "missing required modality s1" in reject["reason"]
    assert verify(str(out), deep=False) == []
    samples = [
        json.loads(m["json"])
        for s in manifest["shards"]
        for _, m in iter_shard_samples(DatasetRoot(str(out)), s["path"])
    ]
    by_location: dict[str, set[str]] = {}
    for s in samples:
        # S1 is two pixels east of S2 in the files: recorded, and the sample is georeferenced by S2.
        s1_grid, s2_grid = s["grids"]["s1"]["transform"], s["grids"]["s2"]["transform"]
        assert s1_grid[2] - s2_grid[2] == 20.0 and s["transform"] == s2_grid
        assert s["s2_acquisition"][4:6] == s["s1_acquisition"][21:23]  # same month: same season
        by_location.setdefault(s["location"], set()).add(s["split"])
    assert all(len(v) == 1 for v in by_location.values()) and set(by_location) == {"0000000", "0000002"}
    _train_two_steps(out, tmp_path, monkeypatch, mlflow_uri)


def test_bigearthnet_multilabel_classification_on_a_label_budget(
    ben_dataset, tmp_path, monkeypatch, mlflow_uri
):
    from eossl.eval.classify import ClassifyConfig, run_classification
    from eossl.eval.preflight import check_grid_inputs
    from eossl.eval.probes import ProbeConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    common = dict(dataset=str(ben_dataset), out=str(tmp_path / "eval"), inputs=("s1s2",), budget="2")
    common |= dict(protocol="knn", inits=("random",), random_backbone="resnet18", label="bigearthnet19")
    with pytest.raises(ValueError, match="multi-label: evaluate with --multilabel"):
        check_grid_inputs(ClassifyConfig(**common))
    with pytest.raises(ValueError, match="its labels are bigearthnet19"):
        check_grid_inputs(ClassifyConfig(**{**common, "label": "igbp_simple"}, multilabel=True))
    from eossl.eval.config import SegmentConfig

    with pytest.raises(ValueError, match="no land-cover layer"):
        check_grid_inputs(
            SegmentConfig(dataset=str(ben_dataset), out=str(tmp_path / "seg"), inits=("random",))
        )
    cfg = ClassifyConfig(**common, multilabel=True, probe=ProbeConfig(batch_size=4, knn_k=2))
    run_classification(cfg)
    cell = json.loads(next((tmp_path / "eval" / "cells").glob("*/metrics.json")).read_text())
    (seed,) = cell["per_seed"]
    assert seed["train_samples"] == 2 and seed["test_samples"] >= 1
    assert len(seed["per_class"]["f1"]) == 19
    for name in ("map", "f1_micro", "f1_macro"):
        assert seed[name] is None or 0.0 <= seed[name] <= 1.0
    assert seed["map"] is not None


def test_ssl4eo_l2a_is_read_by_name_with_its_own_band_table(ssl_tree, tmp_path):
    out = tmp_path / "ds"
    cfg = IngestConfig(
        source=str(ssl_tree),
        dataset=str(out),
        workers=1,
        progress=False,
        split=SPLIT,
        source_format="ssl4eo-s12-l2a",
    )
    assert run_ingest(cfg).written == 7
    manifest = json.loads((out / "manifest.json").read_text())
    bands = manifest["source"]["modalities"]["s2"]["bands"]
    assert manifest["source"]["format"] == "ssl4eo-s12-l2a" and len(bands) == 12 and "B10" not in bands
    assert "L2A" in manifest["source"]["modalities"]["s2"]["unit"]
    with rasterio.open(next((ssl_tree / "s2a").glob("*/*/B11.tif"))) as ds:
        assert ds.shape == (132, 132)  # 20 m
    assert verify(str(out), deep=False) == []


def test_bigearthnet_bad_patches_are_rejected_naming_the_file_and_the_reason(ben_tree, tmp_path):
    import shutil

    src = Path(shutil.copytree(ben_tree, tmp_path / "src"))
    s2_folders = sorted((src / "BigEarthNet-v1.0").iterdir())
    s1_folders = sorted((src / "BigEarthNet-S1-v1.0").iterdir())
    (s2_folders[0] / f"{s2_folders[0].name}_B8A.tif").unlink()
    meta = s2_folders[1] / f"{s2_folders[1].name}_labels_metadata.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "labels": ["Broadleaved forest"]}))
    orphan = s1_folders[2] / f"{s1_folders[2].name}_labels_metadata.json"
    doc = json.loads(orphan.read_text())
    partner = doc["corresponding_s2_patch"]
    orphan.write_text(json.dumps({**doc, "corresponding_s2_patch": "S2A_MSIL2A_20170613T101031_99_99"}))
    cfg = IngestConfig(source=str(src), dataset=str(tmp_path / "ds"), workers=1, progress=False, split=SPLIT)
    summary = run_ingest(cfg)
    assert (summary.found, summary.written) == (10, 6)  # the orphan S1 is a sample; its S2 lost its S1
    rejects = {
        json.loads(line)["key"]: json.loads(line)
        for line in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()
    }
    assert "s2 band files missing: ['B8A']" in rejects[s2_folders[0].name]["reason"]
    assert str(s2_folders[0]) in rejects[s2_folders[0].name]["errors"][0]["file"]
    bad = rejects[s2_folders[1].name]["errors"][0]
    assert bad["file"] == str(meta) and "unknown CORINE label(s) ['Broadleaved forest']" in bad["reason"]
    assert "missing required modality s2" in rejects["S2A_MSIL2A_20170613T101031_99_99"]["reason"]
    assert "missing required modality s1" in rejects[partner]["reason"]


def test_streaming_selects_bands_by_the_dataset_band_table(ben_dataset):
    from eossl.streaming.inputs import InputSpec, dataset_patch_size, stored_s2_bands

    manifest = json.loads((ben_dataset / "manifest.json").read_text())
    stored = stored_s2_bands(manifest)
    assert stored == BEN_S2.bands and dataset_patch_size(manifest) == 120
    spec = InputSpec.parse("s2", "B11,B12,B8A")
    assert spec.stored_index(stored).tolist() == [10, 11, 8]  # SEN12MS's 13-band order would be 11, 12, 8
    mean, _ = spec.normalisation(manifest)
    assert mean.tolist() == pytest.approx([manifest["stats"]["s2"]["mean"][i] for i in (10, 11, 8)])
    with pytest.raises(ValueError, match="stores no S2 band B10"):
        InputSpec.parse("s2", "all").stored_index(stored)
