"""reBEN (BigEarthNet v2.0): pairing, labels and the official split from its metadata table, end to end.

The tree is written by the real sample-data writer in reBEN's layout (patch folders without metadata
files, ``metadata.parquet`` and the snow/cloud table); faults are made in a copy of it (folders removed
or added, table rows changed, the tables rewritten as CSV) and ingested for real.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from eossl.ingest.bigearthnet import BEN19_CLASSES, BEN_S2
from eossl.ingest.config import IngestConfig, SplitOptions
from eossl.ingest.format import decode_member
from eossl.ingest.reben import REBEN_SOURCE, SNOW_CLOUD_TABLE, read_table
from eossl.ingest.sample_sources import write_bigearthnet_sample, write_reben_sample, write_reben_table
from eossl.ingest.sources import detect_source
from eossl.ingest.storage import DatasetRoot
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest
from eossl.ingest.zarr_store import iter_shard_samples

from conftest import TINY_MOCO

# The holdout fraction is set to show it is not what splits a reBEN dataset: the table does.
SPLIT = SplitOptions(holdout_fraction=0.5, budgets=(2,), budget_seeds=(0,))


@pytest.fixture(scope="module")
def reben_tree(module_tmp) -> Path:
    out = module_tmp("reben") / "src"
    write_reben_sample(out, patches=9, seed=3, patches_per_product=3)
    return out


@pytest.fixture(scope="module")
def reben_dataset(reben_tree, module_tmp) -> Path:
    out = module_tmp("reben") / "ds"
    summary = run_ingest(
        IngestConfig(source=str(reben_tree), dataset=str(out), workers=1, progress=False, split=SPLIT)
    )
    assert summary.complete and (summary.found, summary.written, summary.rejected) == (9, 7, 2)
    return out


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _samples(dataset: Path) -> list[dict]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return [
        json.loads(m["json"])
        for s in manifest["shards"]
        for _, m in iter_shard_samples(DatasetRoot(str(dataset)), s["path"])
    ]


def _copy_patch(folder: Path, name: str) -> str:
    """Copy a patch folder beside itself under ``name`` (its band files renamed alike); returns ``name``."""
    target = folder.parent / name
    target.mkdir()
    for f in folder.iterdir():
        shutil.copy(f, target / f.name.replace(folder.name, name))
    return name


def _rejects(dataset: Path) -> dict[str, dict]:
    lines = (dataset / "rejects.jsonl").read_text().splitlines()
    return {json.loads(line)["key"]: json.loads(line) for line in lines}


def test_reben_is_detected_by_its_table_and_written_by_sample_data(reben_tree, tmp_path):
    from eossl.launch.cli import main

    assert detect_source(str(reben_tree)).name == "bigearthnet-v2"
    out = tmp_path / "cli"
    assert main(["sample-data", str(out), "--layout", "bigearthnet-v2", "--patches", "2"]) == 0
    assert detect_source(str(out)).name == "bigearthnet-v2"
    assert [r["patch_id"] for r in _rows(out / "metadata.parquet")] == sorted(
        p.name for p in (out / "BigEarthNet-S2").glob("*/*")
    )
    # v1.0 names its patches alike: without reBEN's table at the top, a tree is BigEarthNet-MM.
    write_bigearthnet_sample(tmp_path / "v1", patches=1)
    assert detect_source(str(tmp_path / "v1")).name == "bigearthnet-mm"


def test_reben_ingests_with_the_tables_labels_split_and_snow_cloud_rejects(reben_tree, reben_dataset):
    manifest = json.loads((reben_dataset / "manifest.json").read_text())
    src = manifest["source"]
    assert src["format"] == "bigearthnet-v2" and src["patch_size"] == 120
    assert src["modalities"]["s2"]["bands"] == list(BEN_S2.bands)
    assert src["label_schemes"]["bigearthnet19"] == list(BEN19_CLASSES)
    assert set(src["listing"]["tables"]) == {"metadata.parquet", SNOW_CLOUD_TABLE}
    assert src["listing"]["rows_without_files"] == 0
    assert verify(str(reben_dataset), deep=True) == []

    # Snow and cloud patches (listed in the second table) are rejected, naming the table's row and flag.
    table = {r["patch_id"]: r for r in _rows(reben_tree / "metadata.parquet")}
    flagged = {r["patch_id"]: r for r in _rows(reben_tree / SNOW_CLOUD_TABLE)}
    rejects = _rejects(reben_dataset)
    assert set(rejects) == set(flagged) and len(flagged) == 2
    for key, row in flagged.items():
        flag = "contains_seasonal_snow" if row["contains_seasonal_snow"] else "contains_cloud_or_shadow"
        why = "seasonal snow" if flag == "contains_seasonal_snow" else "clouds or cloud shadows"
        assert rejects[key]["reason"].startswith(f"covered by {why} ({SNOW_CLOUD_TABLE} row ")
        assert rejects[key]["reason"].endswith(f": {flag})")

    # Every written sample is a row of metadata.parquet: its labels, split, country and S1 partner.
    samples = _samples(reben_dataset)
    assert sorted(s["key"] for s in samples) == sorted(table)
    for s in samples:
        row = table[s["key"]]
        assert s["labels"]["names"] == row["labels"] and s["split"] == row["split"]
        codes = [BEN19_CLASSES.index(n) + 1 for n in row["labels"]]
        assert s["labels"]["bigearthnet19_multi"] == sorted(codes)
        assert s["country"] == row["country"] and s["s1_patch"] == row["s1_name"]
        assert s["files"]["s1:VV"].endswith(f"/{row['s1_name']}/{row['s1_name']}_VV.tif")
        assert s["scene_id"] == s["product"] == s["key"].rsplit("_", 2)[0]

    # The bytes are the GeoTIFFs' (S1 bit-exact; 10 m S2 band exact).
    key, members = next(iter_shard_samples(DatasetRoot(str(reben_dataset)), manifest["shards"][0]["path"]))
    meta = json.loads(members["json"])
    with rasterio.open(reben_tree / meta["files"]["s1:VH"]) as ds:  # paths relative to the source
        assert decode_member(members["s1.npy"])[1].tobytes() == ds.read(1).tobytes()
    with rasterio.open(reben_tree / meta["files"]["s2:B04"]) as ds:
        assert np.array_equal(decode_member(members["s2.npy"])[BEN_S2.bands.index("B4")], ds.read(1))

    # The official split, not the holdout fraction: counts, subsets and the manifest's split account.
    split_of = {r["patch_id"]: r["split"] for r in table.values()}
    want = {s: sorted(k for k, v in split_of.items() if v == s) for s in ("train", "validation", "test")}
    counts = manifest["counts"]
    assert (counts["train"], counts["validation"], counts["test"]) == (3, 2, 2)
    splits = manifest["splits"]
    assert splits["protocol"] == "source_table" and splits["per_split"] == {
        "test": 3,
        "train": 3,
        "validation": 3,
    }
    assert len(splits["train_scenes"]) == len(splits["validation_scenes"]) == len(splits["test_scenes"]) == 1
    import zarr

    group = zarr.open_group(str(reben_dataset / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    subsets = json.loads((reben_dataset / "subsets.json").read_text())
    for name, expected in want.items():
        assert sorted(keys[i] for i in subsets[name]) == expected
        assert [str(v) for v in group["split"][subsets[name]]] == [name] * len(expected)
    assert set(subsets["budgets"]["budget_2_seed0"]) <= set(subsets["train"])
    assert group["multilabel_bigearthnet19"].shape == (7, 19)
    assert sorted(str(c) for c in group["country"][:]) == sorted(table[k]["country"] for k in keys)

    from eossl.streaming.zarr_dataset import resolve_rows

    rows = resolve_rows(DatasetRoot(str(reben_dataset)), "validation", len(keys))
    assert rows.tolist() == subsets["validation"]

    # The same command again finds the finished dataset (its plan, tables included, matches).
    again = run_ingest(
        IngestConfig(
            source=str(reben_tree), dataset=str(reben_dataset), workers=1, progress=False, split=SPLIT
        )
    )
    assert again.complete and (again.written, again.rejected) == (7, 2)


def test_reben_pairing_errors_are_named_and_every_input_is_written_or_rejected(reben_tree, tmp_path, capsys):
    src = Path(shutil.copytree(reben_tree, tmp_path / "src"))
    rows = sorted(_rows(src / "metadata.parquet"), key=lambda r: r["patch_id"])
    flagged = _rows(src / SNOW_CLOUD_TABLE)
    s2_of = {p.name: p for p in (src / "BigEarthNet-S2").glob("*/*")}
    s1_of = {p.name: p for p in (src / "BigEarthNet-S1").glob("*/*")}
    no_s1, no_s2, bad_label = rows[0], rows[1], rows[2]
    shutil.rmtree(s1_of[no_s1["s1_name"]])  # the table names an S1 patch the tree lacks
    shutil.rmtree(s2_of[no_s2["patch_id"]])  # and an S2 folder the tree lacks (its S1 is there)
    bad_label["labels"] = ["Broadleaved forest"]  # not the nomenclature's spelling
    # An S2 folder and an S1 folder that no row names (copies under new names).
    stray_s2 = _copy_patch(s2_of[rows[3]["patch_id"]], rows[3]["patch_id"].replace("_N9999_", "_N0001_"))
    stray_s1 = _copy_patch(s1_of[rows[3]["s1_name"]], rows[3]["s1_name"].replace("_33UUP_", "_33UUQ_"))
    # A row whose patch has no file at all (a partial download) is counted, not a sample.
    ghost = {
        **rows[4],
        "patch_id": rows[4]["patch_id"][:-2] + "99",
        "s1_name": rows[4]["s1_name"][:-2] + "99",
    }
    # The tables as CSV (what is read without pyarrow).
    (src / "metadata.parquet").unlink()
    (src / SNOW_CLOUD_TABLE).unlink()
    write_reben_table(src / "metadata.csv", [*rows, ghost])
    write_reben_table(src / SNOW_CLOUD_TABLE.replace(".parquet", ".csv"), flagged)
    assert detect_source(str(src)).name == "bigearthnet-v2"

    out = tmp_path / "ds"
    summary = run_ingest(
        IngestConfig(source=str(src), dataset=str(out), workers=1, progress=False, split=SPLIT)
    )
    assert (
        "1 rows of metadata.csv or metadata_for_patches_with_snow_cloud_or_shadow.csv have no S1 or S2"
        in (capsys.readouterr().err)
    )
    rejects = _rejects(out)
    row_of = {r["patch_id"]: i + 1 for i, r in enumerate([*rows, ghost])}
    reason = rejects[no_s1["patch_id"]]["reason"]
    assert "missing required modality s1" in reason
    assert (
        f"S1 patch {no_s1['s1_name']} named by metadata.csv row {row_of[no_s1['patch_id']]} is not" in reason
    )
    assert rejects[no_s1["patch_id"]]["errors"][0]["file"] == str(s2_of[no_s1["patch_id"]])
    reason = rejects[no_s2["patch_id"]]["reason"]
    assert (
        f"missing required modality s2 (S2 patch folder {no_s2['patch_id']} named by metadata.csv" in reason
    )
    reason = rejects[bad_label["patch_id"]]["reason"]
    assert (
        f"metadata.csv row {row_of[bad_label['patch_id']]}: label(s) ['Broadleaved forest'] are not" in reason
    )
    assert rejects[stray_s2]["reason"].startswith("S2 patch not in metadata.csv or metadata_for_patches")
    assert rejects[stray_s1]["reason"].startswith("S1 patch named by no s1_name of metadata.csv")
    assert ghost["patch_id"] not in rejects
    manifest = json.loads((out / "manifest.json").read_text())
    listing = manifest["source"]["listing"]
    assert listing["rows_without_files"] == 1 and listing["rows_without_files_examples"] == [
        ghost["patch_id"]
    ]
    assert set(listing["tables"]) == {"metadata.csv", "metadata_for_patches_with_snow_cloud_or_shadow.csv"}

    # Every GeoTIFF of the tree is in a written sample or in a reject; the counts add up.
    tifs = {str(p) for p in src.rglob("*.tif")}
    written = {str(src / f) for s in _samples(out) for f in s["files"].values()}
    refused = {f for r in rejects.values() for paths in r["files"].values() for f in paths}
    assert written | refused == tifs and not written & refused
    assert summary.found == summary.written + summary.rejected == 11
    assert (summary.written, len(rejects)) == (4, 7)  # 2 snow/cloud, 2 unpaired rows, 1 label, 2 strays
    assert verify(str(out), deep=False) == []


def test_reben_table_errors_name_the_file_and_the_row(reben_tree, tmp_path, monkeypatch):
    table = reben_tree / "metadata.parquet"
    rows = _rows(table)

    def csv_bytes(rows: list[dict], name: str = "metadata.csv") -> bytes:
        return write_reben_table(tmp_path / name, rows).read_bytes()

    assert [r.patch_id for r in read_table(csv_bytes(rows), "t/metadata.csv")] == [
        r["patch_id"] for r in rows
    ]
    with pytest.raises(
        ValueError, match=r"t/metadata.csv: row 2: split 'val' is not one of train, validation"
    ):
        read_table(csv_bytes([rows[0], {**rows[1], "split": "val"}]), "t/metadata.csv")
    with pytest.raises(ValueError, match=r"row 1: patch_id 'B01' is not a Sentinel-2 patch name"):
        read_table(csv_bytes([{**rows[0], "patch_id": "B01"}]), "t/metadata.csv")
    with pytest.raises(ValueError, match=r"row 1: contains_seasonal_snow is 'maybe', not a boolean"):
        read_table(csv_bytes([{**rows[0], "contains_seasonal_snow": "maybe"}]), "t/metadata.csv")
    with pytest.raises(ValueError, match=r"t/metadata.csv: missing column\(s\) s1_name \(found: patch_id"):
        read_table(b"patch_id,labels,split,country\nx,,train,Austria\n", "t/metadata.csv")

    with pytest.raises(ValueError, match=r"t/metadata.parquet: not a readable parquet table"):
        read_table(table.read_bytes()[:200], "t/metadata.parquet")  # a truncated download

    # One patch in both tables, or one S1 patch paired twice, contradicts the pairing: refused.
    src = Path(shutil.copytree(reben_tree, tmp_path / "dup"))
    write_reben_table(src / SNOW_CLOUD_TABLE, [*_rows(src / SNOW_CLOUD_TABLE), rows[0]])
    with pytest.raises(
        ValueError, match=rf"patch_id {rows[0]['patch_id']} is in metadata.parquet row \d+ and in"
    ):
        REBEN_SOURCE.scan(str(src))
    (src / "metadata.parquet").unlink()
    with pytest.raises(ValueError, match="has no metadata.parquet \\(or metadata.csv\\) at its top"):
        REBEN_SOURCE.scan(str(src))

    # Without pyarrow a parquet table is refused with how to convert it (and the CSV is read instead).
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"metadata.parquet: reading a parquet table needs pyarrow") as err:
        read_table(table.read_bytes(), str(table))
    assert "metadata.csv beside it" in str(err.value) and "to_csv('metadata.csv'" in str(err.value)


def test_reben_trains_and_is_evaluated_multilabel_on_its_official_split(reben_dataset, tmp_path, monkeypatch):
    """The dataset flows on unchanged: two MoCo steps on its patches, then k-NN multi-label scores whose
    labelled samples come from the table's train split and test samples from its test split."""
    from eossl.eval.classify import ClassifyConfig, run_classification
    from eossl.eval.probes import ProbeConfig
    from eossl.train.config import load_config
    from eossl.train.loop import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    values = {**TINY_MOCO, "batch_size": "2", "data": str(reben_dataset), "out": str(tmp_path / "run")}
    values |= {"split": "all", "max_steps": "2", "log_every": "1", "ckpt_every": "0"}
    result = train(load_config("moco", None, values), resume=False)
    assert result.steps == 2 and np.isfinite(result.final_loss)

    subsets = json.loads((reben_dataset / "subsets.json").read_text())
    splits = {s["key"]: s["split"] for s in _samples(reben_dataset)}
    cfg = ClassifyConfig(
        dataset=str(reben_dataset),
        out=str(tmp_path / "eval"),
        inputs=("s1s2",),
        budget="all",
        protocol="knn",
        inits=("random",),
        random_backbone="resnet18",
        label="bigearthnet19",
        multilabel=True,
        probe=ProbeConfig(batch_size=4, knn_k=2),
    )
    run_classification(cfg)
    (seed,) = json.loads(next((tmp_path / "eval" / "cells").glob("*/metrics.json")).read_text())["per_seed"]
    assert seed["train_samples"] == sum(v == "train" for v in splits.values()) == len(subsets["train"])
    assert seed["test_samples"] == sum(v == "test" for v in splits.values())
    assert len(seed["per_class"]["f1"]) == 19 and seed["map"] is not None and 0.0 <= seed["map"] <= 1.0
