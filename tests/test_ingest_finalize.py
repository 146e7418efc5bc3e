"""Finalisation streams the unit records: its outputs stay what they were, and its memory per sample is
columns of numbers, not Python objects (unit records fabricated in the writer's format: no GeoTIFFs)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from unit_records import SOURCES, finalize_peak_bytes, write_unit_records

from eossl.ingest.finalize import finalize
from eossl.ingest.format import CATALOG, MANIFEST, REJECTS, SUBSETS
from eossl.ingest.storage import DatasetRoot

# What a manifest records about the run rather than the data: left out of the comparison.
_RUN_FIELDS = ("created", "command", "host", "eossl_version", "manifest_sha256")

# sha256 of each output of finalising ``write_unit_records(dir, source, 130, per_unit=25)``, as written by
# finalisation before it streamed (``_digests``). An output that changes here changes every dataset;
# after a format change made on purpose, ``python tests/test_ingest_finalize.py`` prints the new digests.
GOLDEN: dict[str, dict[str, str]] = {
    "sen12ms": {
        "catalog.npz": "cb56ba29f7c7b99d9edef6cb9da1e38794efe012e2774678255c6563dfb48f5c",
        "manifest.json": "f2234169505515b4e684c7d01e70c5b8d0dbc1adfee3f1f6d0341cabe4abfbd2",
        "rejects.jsonl": "a3561c981a5c7a3bd2e7a8be24463470e28de7c13188f881f9b6250823e9a1de",
        "shards/shard-000000.idx": "f34a63c74ae3001c657e795011effc31db6a1c7a0b0db167e1327317d70cd2ae",
        "shards/shard-000001.idx": "2b1f36b212cca45f9b377153dbcb438682d6a7a713594dee003c734ebc585102",
        "shards/shard-000002.idx": "21ba95f45551eafd70284fc93247706afe63d7a25952b6f939a14a343f3e4861",
        "shards/shard-000003.idx": "f9b768fddd162e4eeabbfa82ea98d99b6d315d20bcba6244a86a5fa8e186d81a",
        "shards/shard-000004.idx": "a95fa843c219db5ceac9843889db3f9ad132c4a45529009eb002492ef63d0c3f",
        "shards/shard-000005.idx": "1f9f985f449d971514f222641d17918c8d7bc4c3b71610141334c389f9098255",
        "splits/holdout_scenes.txt": "90ab8487bc8cdc84fcbfbfa82da8ad09871fb1e2166adc7cb69282988d7ee732",
        "splits/test_list.txt": "51e743a71d717b7ce2c34ca3c19d1b5b0d0a49ccf31f48ddd1f9a59ae67da16a",
        "splits/train_list.txt": "534bf9d9493f759074c75137c44494a22b4cf3f00d1411033114c1ade52e5d40",
        "subsets.json": "160b9ce18464999059687b4c474e629cefbeeddef63f02983395da57befbf67b",
    },
    "bigearthnet-mm": {
        "catalog.npz": "f1ef7371e1ef38c6b8f41dd61cb7fbb0eff73e0222357151e0b7af45e2b0a5a4",
        "manifest.json": "30b990ee0f660c33d89638d04f1b5a5ae1ea22521a4beb7afbbb16bf5ff877da",
        "rejects.jsonl": "95085bf9e166e4898ed991436a08150c6b3ab49e0b8a3b10d4c4236325606900",
        "shards/shard-000000.idx": "a7a804516514d1afd7211578f6d856b50b195f4f1f813c1964f59612b65fc70f",
        "shards/shard-000001.idx": "82b60d7cba308222b0ae04d72365f06a887a2a60d68eb172e3f43d72f371ab4a",
        "shards/shard-000002.idx": "b357baf581decbac3ca04f7080261e9cb52ed52f6f82c4a2d841befd324358e7",
        "shards/shard-000003.idx": "f808c36fc13e960fdb8e76718e97aa1e3d4df67813d97db334d6b75c67df3b0c",
        "shards/shard-000004.idx": "8aece00c64c1cbb8669cb571e90f85bca2a4037e19bef57e9d687d9cb1d9532e",
        "shards/shard-000005.idx": "c320460e3b7c1d6cc141d78ce6a5d1469c286e1b88ffecacde76c7068c3ae1b9",
        "subsets.json": "454c5c8dfe980a2c5bc2d69b775186bc65514841284fe9e541fae96d5aed522b",
    },
    "ssl4eo-s12": {
        "catalog.npz": "637a203d1378e059ecc4065b02fe2dfbd260a10ec1092e75dfea24c6ba5d3831",
        "manifest.json": "a02503ae11e40585c4b7db2c57e2464b86d22e2d635a5fcb048ac33bafaa6f63",
        "rejects.jsonl": "16da461268ced18350fd59c1a5b1b72536a3a07cea4e60934bf84992844d1552",
        "shards/shard-000000.idx": "a34cf5c12c7ba9123cc91a57b4813b457ea657e92a21d2eb822abf4a72c69d77",
        "shards/shard-000001.idx": "f8b15770bad0dff076b7d3aa260d46f48f15a3f0f51831365eba0844d621415b",
        "shards/shard-000002.idx": "d445a06bcf8b878dc8e7e05104aecf956456a607a1ad372aec6850e4ced7af99",
        "shards/shard-000003.idx": "012c8fab1993fdbf68341574e02a2294020b798701a983e5143a5063fd68c1b5",
        "shards/shard-000004.idx": "912553623790ee398ae1fb99d7abab77165d3049217beee7f05ab8cd7a83909c",
        "shards/shard-000005.idx": "5afea07cccbc0265107883d3fc46f018a4fe921e3897489717642d7168d59b46",
        "subsets.json": "d7cabaf4e8e36967fc612834e98e5d3beb29c6da02312c64b1d9e273211293c0",
    },
}


def _npz_digest(data: bytes) -> str:
    """Digest of an ``.npz``'s members (names, order, ``.npy`` bytes): the zip's own timestamps left out."""
    h = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            h.update(info.filename.encode() + b"\0" + z.read(info) + b"\0")
    return h.hexdigest()


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file finalisation wrote (catalog by its arrays, manifest without its run fields)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if rel == CATALOG:
            out[rel] = _npz_digest(data)
            continue
        if rel == MANIFEST:
            manifest = json.loads(data)
            for field in _RUN_FIELDS:
                manifest.pop(field)
            if manifest["catalog"]:  # the catalog by its arrays (the zip records when it was written)
                manifest["catalog"]["sha256"] = _npz_digest((root / CATALOG).read_bytes())
            data = json.dumps(manifest, sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("source", SOURCES)
def test_finalized_outputs_are_unchanged(source, tmp_path):
    write_unit_records(tmp_path / "ds", source, 130, per_unit=25)
    manifest = finalize(DatasetRoot(str(tmp_path / "ds")), workers=1, command=("test",))
    got = _digests(tmp_path / "ds")
    assert {REJECTS, SUBSETS, CATALOG, MANIFEST} <= set(got)
    assert manifest["counts"]["samples_written"] == 130
    assert got == GOLDEN[source]


def test_memory_per_sample_is_columns_not_python_objects(tmp_path):
    # Peak traced memory at two sizes, same unit size: what the extra samples add. Per-sample dicts (the
    # unit records kept whole) cost ~6,000 bytes a sample here; the columns ~300 (docs/BENCHMARKS.md).
    small, large = 300, 1500
    for n in (small, large):
        write_unit_records(tmp_path / str(n), "sen12ms", n, per_unit=100)
    peaks = {n: finalize_peak_bytes(tmp_path / str(n)) for n in (small, large)}
    per_sample = (peaks[large] - peaks[small]) / (large - small)
    assert 0 < per_sample < 1000, peaks


if __name__ == "__main__":  # prints GOLDEN for the code installed (run once, before a change)
    import tempfile

    golden = {}
    for src in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            write_unit_records(Path(tmp) / "ds", src, 130, per_unit=25)
            finalize(DatasetRoot(str(Path(tmp) / "ds")), workers=1, command=("test",))
            golden[src] = _digests(Path(tmp) / "ds")
    print(json.dumps(golden, indent=4))
