"""The published SEN12MS split files: read as published, applied by ingest, written back out in kind."""

from __future__ import annotations

import json
import pickle

import pytest
import zarr

from eossl.ingest.config import SplitOptions
from eossl.ingest.splits import (
    canonical_scene,
    official_patch_name,
    official_scene_name,
    patch_list_split,
    read_patch_list,
    read_scene_list,
    scene_split,
)

from conftest import run_cli

# The first lines of SEN12MS_holdOutScenes.txt as the authors publish it.
PUBLISHED_HOLDOUT = (
    "ROIs1158_spring/s1_63\nROIs1158_spring/s1_146\nROIs1868_summer/s1_43\nROIs2017_winter/s1_135\n"
)


def test_published_holdout_list_and_other_spellings_read_as_scene_ids():
    assert read_scene_list(PUBLISHED_HOLDOUT, "holdout.txt") == (
        "ROIs1158_spring_63",
        "ROIs1158_spring_146",
        "ROIs1868_summer_43",
        "ROIs2017_winter_135",
    )
    text = (
        "# test scenes\n\n"
        "ROIs1158_spring/s1_63/\n"  # trailing slash (a folder path)
        "ROIs1158_spring_s2_146   # the S2 folder names the same scene\n"
        "ROIs1868_summer_43\n"
        "  ROIs2017_winter/lc_135  \n"
        "ROIs1158_spring/s1_63\n"  # a duplicate is the same scene once
    )
    assert read_scene_list(text, "h.txt") == read_scene_list(PUBLISHED_HOLDOUT, "holdout.txt")
    assert canonical_scene("ROIs1158_Spring/S1_063") == "ROIs1158_spring_63"
    assert official_scene_name("ROIs1158_spring_63") == "ROIs1158_spring/s1_63"
    for bad in ("ROIs1158_spring/s3_63", "ROIs1158_spring", "spring_63", "ROIs1158_spring_1_p30"):
        with pytest.raises(ValueError, match=r"h\.txt:2: .* is not a SEN12MS scene"):
            read_scene_list(f"ROIs1158_spring_1\n{bad}\n", "h.txt")


def test_scene_split_takes_published_spelling_and_names_an_unknown_entry():
    scenes = [f"ROIs1158_spring_{i}" for i in (1, 63, 146)]
    split = scene_split(scenes, 0.1, 0, holdout_scenes=["ROIs1158_spring/s1_63", "ROIs1158_spring_146"])
    assert split == {
        "ROIs1158_spring_1": "train",
        "ROIs1158_spring_63": "test",
        "ROIs1158_spring_146": "test",
    }
    with pytest.raises(ValueError, match=r"ROIs1868_summer/s1_43 \(entry 2\)"):
        scene_split(scenes, 0.1, 0, holdout_scenes=["ROIs1158_spring_63", "ROIs1868_summer/s1_43"])
    with pytest.raises(ValueError, match="either hold-out scenes or split lists"):
        SplitOptions(holdout_scenes=("ROIs1158_spring_63",), split_lists="lists/")


def test_patch_lists_as_text_and_as_the_benchmark_pickle():
    names = ["ROIs1158_spring_s2_124_p100.tif", "ROIs1158_spring_s2_124_p30.tif", "ROIs1970_fall_s2_1_p7.tif"]
    keys = ("ROIs1158_spring_124_p100", "ROIs1158_spring_124_p30", "ROIs1970_fall_1_p7")
    text = "\n".join(names) + "\n"
    assert read_patch_list(text.encode(), "test_list.txt") == keys
    # Other sensors' names and folder prefixes name the same sample.
    other = "ROIs1158_spring/s1_124/ROIs1158_spring_s1_124_p100.tif\nROIs1158_spring_lc_124_p30.tif\n"
    assert read_patch_list(other.encode(), "l.txt") == keys[:2]
    for protocol in (0, 2, 4, 5):
        data = pickle.dumps(names, protocol=protocol)
        assert read_patch_list(data, "train_list.pkl") == keys, protocol
    assert read_patch_list(pickle.dumps(set(names), protocol=2), "s.pkl") == tuple(sorted(keys))
    assert [official_patch_name(k) for k in keys] == names
    with pytest.raises(ValueError, match=r"t\.txt:2: 'ROIs1158_spring_s2_cloudy_1_p1\.tif' is not"):
        read_patch_list(b"ROIs1158_spring_s2_1_p1.tif\nROIs1158_spring_s2_cloudy_1_p1.tif\n", "t.txt")
    with pytest.raises(ValueError, match=r"x\.pkl: item 2 is int"):
        read_patch_list(pickle.dumps([names[0], 3]), "x.pkl")
    with pytest.raises(ValueError, match=r"d\.pkl: a pickled split list must hold a list, found dict"):
        read_patch_list(pickle.dumps({"a": 1}), "d.pkl")


class _Payload:
    """A pickle that creates a file when unpickled by an unrestricted loader."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(["ROIs1158_spring_s2_1_p1.tif", _Payload(str(marker))])
    with pytest.raises(ValueError, match=r"evil\.pkl: not a pickled list of file names .*refusing to load"):
        read_patch_list(data, "evil.pkl")
    assert not marker.exists()
    pickle.loads(data)  # the same bytes do run code when unpickled unrestricted: the test can fail
    assert marker.exists()


def test_patch_list_split_records_mixed_scenes_unlisted_and_missing():
    keys = ["R_spring_1_p1", "R_spring_1_p2", "R_spring_2_p1", "R_spring_2_p2", "R_spring_3_p1"]
    scenes = [k.rsplit("_", 1)[0] for k in keys]
    result = patch_list_split(
        keys,
        scenes,
        train=["R_spring_1_p1", "R_spring_2_p1", "R_spring_9_p1"],
        test=["R_spring_1_p2", "R_spring_2_p2"],
    )
    assert result.patches == {
        "R_spring_1_p1": "train",
        "R_spring_1_p2": "test",
        "R_spring_2_p1": "train",
        "R_spring_2_p2": "test",
        "R_spring_3_p1": "train",
    }
    assert result.scenes == {"R_spring_1": "mixed", "R_spring_2": "mixed", "R_spring_3": "train"}
    assert result.unlisted == ("R_spring_3_p1",) and result.not_found == 1
    with pytest.raises(ValueError, match="1 patches are in both the train and the test list .*R_spring_1_p1"):
        patch_list_split(keys, scenes, train=["R_spring_1_p1"], test=["R_spring_1_p1"])


def _sample_splits(ds) -> dict[str, str]:
    group = zarr.open_group(str(ds / "data.zarr"), mode="r")
    return {str(k): str(s) for k, s in zip(group["key"][:], group["split"][:], strict=True)}


def test_ingest_applies_published_lists_and_writes_them_back(synthetic_source, tmp_path):
    """Lists in both formats: scene ROIs1970_fall_1 all test, ROIs2017_winter_1 half test (mixed), one
    patch unlisted, one listed patch the source lacks. The dataset's split follows the lists exactly,
    the manifest records what they left out, and the files written back read as the same split."""
    test_keys = [f"ROIs1970_fall_1_p{p}" for p in (8, 9, 10, 11)] + [
        "ROIs2017_winter_1_p5",
        "ROIs2017_winter_1_p6",
    ]
    all_keys = sorted(_sample_keys(synthetic_source))
    unlisted = "ROIs1158_spring_2_p6"
    train_keys = [k for k in all_keys if k not in test_keys and k != unlisted] + ["ROIs1158_spring_99_p1"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_list.pkl").write_bytes(
        pickle.dumps([official_patch_name(k) for k in train_keys], protocol=2)
    )
    (lists / "test_list.txt").write_text("".join(official_patch_name(k) + "\n" for k in test_keys))

    ds = tmp_path / "ds"
    proc = run_cli("ingest", str(synthetic_source), str(ds), "--split-lists", str(lists), "--no-progress")
    assert "1 scenes on both sides of the split (e.g. ROIs2017_winter_1)" in proc.stderr
    assert "1 patches are in neither split list and go to train (e.g. ROIs1158_spring_2_p6" in proc.stderr

    splits = _sample_splits(ds)
    assert sorted(k for k, s in splits.items() if s == "test") == sorted(test_keys)
    assert splits[unlisted] == "train" and len(splits) == 24
    manifest = json.loads((ds / "manifest.json").read_text())
    info = manifest["splits"]
    assert info["protocol"] == "patch_lists"
    assert info["mixed_scenes"] == ["ROIs2017_winter_1"] and info["test_scenes"] == ["ROIs1970_fall_1"]
    assert (info["unlisted"], info["unlisted_examples"], info["listed_not_found"]) == (1, [unlisted], 1)
    assert info["listed"] == {"train": len(train_keys), "test": 6}
    assert (manifest["counts"]["train"], manifest["counts"]["test"]) == (18, 6)
    subsets = json.loads((ds / "subsets.json").read_text())
    keys_in_order = list(_sample_splits(ds))
    assert sorted(keys_in_order[i] for i in subsets["test"]) == sorted(test_keys)

    # Written back in the benchmark's formats: s2 file names, the hold-out scene as published.
    written_test = (ds / "splits/test_list.txt").read_text()
    assert written_test == "".join(sorted(official_patch_name(k) + "\n" for k in test_keys))
    assert read_patch_list((ds / "splits/train_list.txt").read_bytes(), "train_list.txt") == tuple(
        sorted((k for k in all_keys if k not in test_keys), key=official_patch_name)
    )
    assert (ds / "splits/holdout_scenes.txt").read_text() == "ROIs1970_fall/s1_1\n"
    run_cli("verify", str(ds))  # the split files sit beside a dataset that still verifies

    # The written hold-out list feeds --holdout-scenes as it is.
    ds2 = tmp_path / "ds2"
    run_cli(
        "ingest",
        str(synthetic_source),
        str(ds2),
        "--holdout-scenes",
        str(ds / "splits/holdout_scenes.txt"),
        "--no-progress",
    )
    manifest2 = json.loads((ds2 / "manifest.json").read_text())
    assert manifest2["splits"]["protocol"] == "holdout_scenes"
    assert (
        manifest2["splits"]["test_scenes"] == ["ROIs1970_fall_1"]
        and manifest2["splits"]["mixed_scenes"] == []
    )
    assert (ds2 / "splits/holdout_scenes.txt").read_text() == "ROIs1970_fall/s1_1\n"
    assert sorted(k for k, s in _sample_splits(ds2).items() if s == "test") == sorted(test_keys[:4])


def test_bad_split_inputs_name_the_file(synthetic_source, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_list.txt").write_text("ROIs1158_spring_s2_1_p19.tif\n")
    proc = run_cli(
        "ingest", str(synthetic_source), str(tmp_path / "ds"), "--split-lists", str(lists), check=False
    )
    assert proc.returncode != 0 and "has no test_list.txt or test_list.pkl" in proc.stderr
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("ROIs1158_spring/s1_1\nROIs1158_spring/s1_x\n")
    proc = run_cli(
        "ingest", str(synthetic_source), str(tmp_path / "ds"), "--holdout-scenes", str(holdout), check=False
    )
    assert (
        proc.returncode != 0 and f"{holdout}:2: 'ROIs1158_spring/s1_x' is not a SEN12MS scene" in proc.stderr
    )
    holdout.write_text("ROIs1158_spring/s1_1\nROIs1158_spring/s1_63\n")
    proc = run_cli(
        "ingest", str(synthetic_source), str(tmp_path / "ds"), "--holdout-scenes", str(holdout), check=False
    )
    assert proc.returncode != 0 and "ROIs1158_spring_63 (entry 2)" in proc.stderr


def _sample_keys(source) -> list[str]:
    from eossl.ingest.layout import scan_source

    return [g.key for g in scan_source(str(source)).groups]
