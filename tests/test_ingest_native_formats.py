"""The dataset opens in its users' own tools: xarray selects by band name and sample key (local and S3,
with no consolidated-metadata warning), and DALI's WebDataset reader reads the shards through the index
files ingest writes, which the manifest and ``eossl verify`` cover."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import zarr

from eossl.ingest.bands import MODALITIES
from eossl.ingest.config import IngestConfig
from eossl.ingest.dali_index import index_path, index_text_from_catalog, webdataset_files
from eossl.ingest.integrity import read_catalog, read_manifest
from eossl.ingest.storage import DatasetRoot
from eossl.ingest.verify import verify
from eossl.ingest.writer import run_ingest
from eossl.ingest.zarr_store import COORDINATES


def _open_without_warnings(url: str, **kwargs):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the consolidated-metadata warning (or any other) fails the test
        return xr.open_zarr(url, **kwargs)


def test_xarray_selects_by_band_name_and_sample_key(dataset):
    ds = _open_without_warnings(str(dataset / "data.zarr"))
    group = zarr.open_group(str(dataset / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    row = 5
    b4 = ds.s2.sel(s2_band="B4", sample=keys[row]).values
    assert b4.tobytes() == group["s2"][row, MODALITIES["s2"].bands.index("B4")].tobytes()
    assert ds.s1.sel(s1_band="VH").sizes == {"sample": len(keys), "y": 256, "x": 256}
    assert ds.lc.sel(lc_band="IGBP", sample=keys[-1]).values.tobytes() == group["lc"][-1, 0].tobytes()
    assert [str(k) for k in ds.sample.values] == keys
    assert str(ds.label_igbp_simple.sel(sample=keys[row]).values) == str(group["label_igbp_simple"][row])
    assert float(ds.fractions_igbp_simple.sel(sample=keys[row], igbp_simple="forest")) == pytest.approx(
        float(group["fractions_igbp_simple"][row, 0])
    )
    assert float(ds.transform.sel(sample=keys[row], coef="a")) == float(group["transform"][row, 0])
    # Consolidated: the root metadata lists every array, so one read opens the store.
    root = json.loads((dataset / "data.zarr" / "zarr.json").read_text())
    assert set(root["consolidated_metadata"]["metadata"]) == set(group.array_keys())


@pytest.mark.slow
def test_an_s3_dataset_opens_in_xarray_and_verifies_with_its_index_files(s3_endpoint, tmp_path):
    """Written to S3 (a real moto server) in process: consolidated metadata and index files over fsspec.
    Slow lane: an ingest to S3 takes ~15 s of small requests even for two patches."""
    import s3fs

    from eossl.ingest.sample_data import write_sample_data

    write_sample_data(tmp_path / "sen12ms", 2)
    s3fs.S3FileSystem().mkdir("native-formats")
    url = "s3://native-formats/ds"
    run_ingest(IngestConfig(source=str(tmp_path / "sen12ms"), dataset=url, progress=False, workers=1))
    ds = _open_without_warnings(
        f"{url}/data.zarr", storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    )
    group = zarr.open_group(DatasetRoot(url).zarr_store("data.zarr", read_only=True), mode="r")
    row = group["key"].shape[0] - 1
    key = str(group["key"][row])
    assert ds.s2.sel(sample=key, s2_band="B8A").values.tobytes() == group["s2"][row, 8].tobytes()
    manifest = read_manifest(DatasetRoot(url))
    assert all(DatasetRoot(url).exists(s["dali_index"]["path"]) for s in manifest["shards"])
    assert verify(url, deep=True) == []


def test_index_files_are_dalis_format_and_match_the_catalog(dataset, tmp_path):
    out = DatasetRoot(str(dataset))
    manifest = read_manifest(out)
    catalog = read_catalog(out, manifest)
    tars, indexes = webdataset_files(str(dataset), manifest)
    assert indexes == [str(dataset / index_path(s["path"])) for s in manifest["shards"]]
    first = (dataset / manifest["shards"][0]["dali_index"]["path"]).read_text().splitlines()
    samples = manifest["shards"][0]["samples"]
    assert first[0] == f"v1.2 {samples}" and len(first) == samples + 1
    # Each line: (ext, data offset, size, member name) per member; check them against the tar itself.
    with open(tars[0], "rb") as f:
        for line in first[1:]:
            fields = line.split()
            assert len(fields) % 4 == 0
            for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
                assert name.split(".", 1)[1] == ext
                f.seek(int(offset))
                data = f.read(int(size))
                assert data.startswith(b"{" if ext == "json" else b"\x93NUMPY")
    for number, path in enumerate(indexes):
        assert open(path, "rb").read() == index_text_from_catalog(catalog, number)

    # Byte for byte what DALI's own tool writes for the shard (wds2idx is installed with DALI).
    wds2idx = pytest.importorskip("wds2idx")
    reference = tmp_path / "reference.idx"
    with wds2idx.IndexCreator(tars[0], str(reference), verbose=False) as creator:
        creator.create_index()
    assert reference.read_bytes() == open(indexes[0], "rb").read()


def test_dali_reads_the_shards_through_the_written_index(dataset):
    """DALI's CPU WebDataset reader, given the index files, yields every sample with the stored bytes."""
    from nvidia.dali import fn, pipeline_def

    manifest = read_manifest(DatasetRoot(str(dataset)))
    tars, indexes = webdataset_files(str(dataset), manifest)
    total = manifest["counts"]["samples_written"]

    @pipeline_def(batch_size=total, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        meta, s2 = fn.readers.webdataset(
            paths=tars,
            index_paths=indexes,
            ext=["json", "s2.npy"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="shards",
        )
        return meta, fn.decoders.numpy(s2)

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("shards") == total
    metas, arrays = pipe.run()
    group = zarr.open_group(str(dataset / "data.zarr"), mode="r")
    keys = [str(k) for k in group["key"][:]]
    got = [json.loads(np.array(m).tobytes())["key"] for m in metas]
    assert got == keys
    for row in (0, total // 2, total - 1):
        hwc = np.array(arrays[row])
        assert np.moveaxis(hwc, -1, 0).tobytes() == group["s2"][row].tobytes()


def test_verify_reports_a_damaged_missing_or_stray_index_file(copy_of_dataset):
    manifest = read_manifest(DatasetRoot(str(copy_of_dataset)))
    first, second = (copy_of_dataset / s["dali_index"]["path"] for s in manifest["shards"][:2])
    text = first.read_bytes()
    first.write_bytes(text.replace(b" 512 ", b" 513 ", 1))  # one offset off by a byte
    second.unlink()
    (copy_of_dataset / "shards" / "stray.idx").write_text("v1.2 0\n")
    problems = verify(str(copy_of_dataset))
    assert any(str(first) in p and "sha256/size differ" in p for p in problems), problems
    assert any(str(second) in p and "missing" in p for p in problems), problems
    assert any("shards/stray.idx" in p and "not listed" in p for p in problems), problems


def test_a_dataset_written_without_coordinates_consolidation_or_index_files_still_reads(copy_of_dataset):
    """What an earlier eossl wrote (same format version): every eossl reader and verify accept it."""
    import shutil

    from eossl.ingest.integrity import manifest_digest
    from eossl.streaming import InputSpec, ZarrPatchDataset

    ds = copy_of_dataset
    root = json.loads((ds / "data.zarr" / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (ds / "data.zarr" / "zarr.json").write_text(json.dumps(root))
    for name in COORDINATES:
        shutil.rmtree(ds / "data.zarr" / name)
    manifest = json.loads((ds / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (ds / shard.pop("dali_index")["path"]).unlink()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (ds / "manifest.json").write_text(json.dumps(manifest))

    assert verify(str(ds), deep=True) == []
    patches = ZarrPatchDataset(str(ds), InputSpec(sensors=("s2",)), rows="test")
    assert patches[0]["x"].shape == (10, 256, 256)
    with pytest.raises(FileNotFoundError, match="wds2idx"):
        webdataset_files(str(ds), manifest)
