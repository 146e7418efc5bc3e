"""The catalog is read once per node and mapped by every process; reader processes get file names."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from eossl.ingest.catalog import CATALOG_MEMBERS
from eossl.ingest.integrity import DatasetCorruptError, read_catalog
from eossl.ingest.storage import DatasetRoot
from eossl.streaming.loader import LoaderConfig, SSLLoader
from eossl.streaming.node_catalog import attach, catalog_folder, detach, node_catalog
from eossl.streaming.plan import PlanConfig
from eossl.streaming.storage import StorageOptions


def test_node_copy_equals_the_catalog_and_serves_without_it(copy_of_dataset, tmp_path):
    out = DatasetRoot(str(copy_of_dataset))
    manifest = json.loads((copy_of_dataset / "manifest.json").read_text())
    reference = read_catalog(out, manifest)
    mapped = node_catalog(out, manifest, str(tmp_path / "cache"))
    assert isinstance(mapped.offset["s2"], np.memmap)
    for name in ("key", "scene_id", "shard", "train", "label_igbp_simple", "multilabel_igbp_simple"):
        assert np.array_equal(getattr(mapped, name), getattr(reference, name)), name
    for m in CATALOG_MEMBERS:
        assert np.array_equal(mapped.offset[m], reference.offset[m])
        assert np.array_equal(mapped.crc32c[m], reference.crc32c[m])
    assert catalog_folder(manifest, str(tmp_path / "cache")).is_dir()
    # every later process of the node maps the copy: catalog.npz is not read again
    (copy_of_dataset / "catalog.npz").unlink()
    again = node_catalog(out, manifest, str(tmp_path / "cache"))
    assert np.array_equal(again.key, reference.key)
    # another node (another cache folder) reads the dataset's catalog, and finds it gone
    with pytest.raises((DatasetCorruptError, FileNotFoundError)):
        node_catalog(out, manifest, str(tmp_path / "other-node"))


def test_reader_processes_get_file_names_not_arrays(dataset, tmp_path):
    cfg = LoaderConfig(batch_size=4, split="all", storage=StorageOptions(cache_dir=str(tmp_path)))
    source = SSLLoader(str(dataset), cfg, rank=0, world_size=1).sample_source()
    data = pickle.dumps(source)
    arrays = sum(a.nbytes for a in (source.shard, source.key, *source.offset.values(), *source.size.values()))
    assert arrays > 0 and all(a.tobytes() not in data for a in source.offset.values())
    copy = pickle.loads(data)
    assert isinstance(copy.offset["s2"], np.memmap) and str(tmp_path) in str(copy.offset["s2"].filename)
    assert np.array_equal(copy.key, source.key) and np.array_equal(copy.size["s2"], source.size["s2"])
    state = detach({"a": np.arange(5), "b": {"c": copy.shard}})
    assert isinstance(state["a"], np.ndarray) and not isinstance(state["b"]["c"], np.ndarray)
    assert np.array_equal(attach(state)["b"]["c"], source.shard)


def test_loader_records_nodes_under_node_affinity(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = LoaderConfig(
        batch_size=2,
        split="all",
        plan=PlanConfig(node_affinity=True),
        storage=StorageOptions(cache_dir=str(tmp_path)),
    )
    two = SSLLoader(str(dataset), cfg, rank=1, world_size=2)
    assert two.cfg.plan.nodes == 2 and two.state_dict()["nodes"] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    one = SSLLoader(str(dataset), cfg, rank=1, world_size=2)
    assert one.cfg.plan.nodes == 1
    with pytest.raises(ValueError, match="over 2 nodes, now 1"):
        one.load_state_dict(two.state_dict())
