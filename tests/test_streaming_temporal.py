"""Temporal positives: view 1 of an SSL4EO-S12 sample from another season of its location.

The partner rule is checked as a pure function, then through the real batch source on a real ingested
SSL4EO-S12 tree (the arrays handed to DALI are the partner's stored arrays) and one CPU batch of the
DALI pipeline.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from eossl.ingest.config import IngestConfig, SplitOptions
from eossl.ingest.sample_sources import write_ssl4eo_sample
from eossl.ingest.writer import run_ingest
from eossl.streaming.inputs import InputSpec
from eossl.streaming.loader import LoaderConfig, SSLLoader
from eossl.streaming.plan import LoaderPosition, PlanConfig
from eossl.streaming.temporal import SeasonPartners
from eossl.streaming.views import ViewConfig, ViewSet


def test_a_partner_is_another_sample_of_the_scene_drawn_from_seed_epoch_and_position():
    scenes = np.array(["a", "b", "a", "c", "a", "b", "d"])
    rows = np.array([0, 1, 2, 3, 4, 5])  # row 6 (scene d) is outside the sample set
    partners = SeasonPartners.build(rows, scenes)
    assert partners.alone == 1  # c has one sample
    assert partners.partner(3, seed=0, epoch=0, position=5) == 3
    drawn = {partners.partner(0, 0, 0, p) for p in range(64)}
    assert drawn == {2, 4}  # every other season of the location, never itself
    assert {partners.partner(1, 0, 0, p) for p in range(8)} == {5}
    assert partners.partner(4, 7, 2, 11) == partners.partner(4, 7, 2, 11)  # a pure function
    assert [partners.partner(0, 0, e, 3) for e in range(16)] != [partners.partner(0, 0, 0, 3)] * 16
    with pytest.raises(ValueError, match="row 6 is not in the epoch's sample set"):
        partners.partner(6, 0, 0, 0)


@pytest.fixture(scope="module")
def ssl_dataset(module_tmp) -> Path:
    src = module_tmp("ssl") / "src"
    write_ssl4eo_sample(src, locations=2, seed=1)
    out = module_tmp("ssl") / "ds"
    split = SplitOptions(holdout_fraction=0.0, budgets=(), budget_seeds=())
    assert run_ingest(IngestConfig(source=str(src), dataset=str(out), workers=1, progress=False, split=split))
    return out


def _loader(dataset: Path, **kw) -> SSLLoader:
    views = ViewConfig(mode="temporal", inputs=InputSpec(sensors=("s1", "s2")), size=32)
    cfg = LoaderConfig(
        batch_size=3,
        split="all",
        device="cpu",
        workers=0,
        num_threads=1,
        views=views,
        plan=PlanConfig(seed=5),
    )
    return SSLLoader(str(dataset), replace(cfg, **kw), rank=0, world_size=1)


def test_the_batch_source_hands_over_the_partners_stored_arrays(ssl_dataset):
    import zarr

    # The last location lacks its winter S1, so (S1 and S2 required) it has 3 samples, the first 4.
    loader = _loader(ssl_dataset)
    source = loader.sample_source()
    group = zarr.open_group(str(ssl_dataset / "data.zarr"), mode="r")
    location = [str(v) for v in group["location"][:]]
    s1, s2 = group["s1"], group["s2"]
    seen = set()
    for iteration in range(len(loader)):
        out = source(SimpleNamespace(epoch_idx=0, iteration=iteration))
        p_s1, p_s2, ids = out[2], out[3], out[4]
        for i, (row, _, _, substituted, _, partner) in enumerate(ids.tolist()):
            assert partner != row and location[partner] == location[row] and not substituted
            assert np.array_equal(p_s2[i], np.moveaxis(s2[partner], 0, -1))
            assert np.array_equal(p_s1[i], np.moveaxis(s1[partner], 0, -1), equal_nan=True)
            assert np.array_equal(out[1][i], np.moveaxis(s2[row], 0, -1))
            seen.add((row, partner))
    assert len(seen) >= 5

    # Resume: a source started at step 1 draws the same samples and partners as the first one did.
    first = source(SimpleNamespace(epoch_idx=0, iteration=1))[4]
    resumed = _loader(ssl_dataset)
    resumed.position = LoaderPosition(0, 1)
    again = resumed.sample_source()(SimpleNamespace(epoch_idx=0, iteration=0))[4]
    assert np.array_equal(first, again)


def test_a_partner_in_a_corrupt_shard_is_replaced_by_its_sample_and_counted(ssl_dataset, tmp_path):
    import shutil

    data = Path(shutil.copytree(ssl_dataset, tmp_path / "ds"))
    loader = _loader(data)
    ids = loader.sample_source()(SimpleNamespace(epoch_idx=0, iteration=0))[4]
    row, partner = int(ids[0, 0]), int(ids[0, 5])
    shard = data / loader.manifest["shards"][int(loader.catalog.shard[partner])]["path"]
    offset = int(loader.catalog.offset["s2"][partner]) + 1000
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0xFF  # one flipped byte in the partner's S2 member
    shard.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="partner of a corrupt shard replaced by its sample"):
        out = _loader(data).sample_source()(SimpleNamespace(epoch_idx=0, iteration=0))
    assert out[4][0].tolist()[3:] == [1, int(loader.catalog.shard[partner]), row]
    assert np.array_equal(out[3][0], out[1][0])  # view 1 from the sample itself
    with pytest.raises(Exception, match="fails its checksum"):
        _loader(data, on_corrupt="fail").sample_source()(SimpleNamespace(epoch_idx=0, iteration=0))


def test_temporal_views_stream_through_dali_and_are_refused_on_a_dataset_without_seasons(
    ssl_dataset, dataset
):
    loader = _loader(ssl_dataset)
    assert ViewSet(loader.cfg.views).sources == 2 and loader.channels == [12, 12]
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(3, 12, 32, 32)] * 2
    assert all(np.isfinite(v.numpy()).all() for v in batch.views)
    with pytest.raises(
        ValueError, match="view mode 'temporal' pairs seasons of one location, which a sen12ms"
    ):
        _loader(Path(dataset))  # SEN12MS: a scene is many neighbouring patches of one acquisition


def test_a_temporal_run_records_the_samples_without_another_season(tmp_path, monkeypatch):
    """A location left with one season is its own partner: trained on, and counted in the run's params."""
    import mlflow

    from eossl.train.config import load_config
    from eossl.train.loop import train

    from conftest import TINY_MOCO

    src = tmp_path / "src"
    write_ssl4eo_sample(src, locations=2, seed=1)
    for modality in src.iterdir():  # location 0000002 keeps its first acquisition of each modality only
        for acquisition in sorted((modality / "0000002").iterdir())[1:]:
            shutil.rmtree(acquisition)
    split = SplitOptions(holdout_fraction=0.0, budgets=(), budget_seeds=())
    data = tmp_path / "ds"
    run_ingest(IngestConfig(source=str(src), dataset=str(data), workers=1, progress=False, split=split))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    values = {**TINY_MOCO, "mode": "temporal", "sensors": "s1s2", "batch_size": "4", "size": "32"}
    values |= {"data": str(data), "out": str(tmp_path / "run"), "max_steps": "2", "ckpt_every": "0"}
    with pytest.warns(UserWarning, match="1 of 5 samples have no other season"):
        result = train(load_config("moco", None, values), resume=False)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    params = mlflow.MlflowClient(uri).get_run(result.mlflow_run_id).data.params
    assert params["temporal_samples_without_partner"] == "1" and params["loader.mode"] == "temporal"
