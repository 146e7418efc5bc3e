"""Every written sample's facts as columns: what finalisation needs from the unit records, compactly.

The unit records hold one JSON object per sample (metadata, labels, member offsets): about 6 KB of Python
objects each once parsed, 1.1 GB for all of SEN12MS in one process. Finalisation needs only a few
fixed-size facts per sample, so the records are read one unit at a time and folded into numpy columns
(under 1 KB a sample); a unit's objects are dropped before the next is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES, MODALITIES, MODALITY_NAMES
from .catalog import CATALOG_MEMBERS, Catalog

__all__ = ["SampleTable", "catalog_of", "iter_json", "read_sample_table"]

_TEXT = ("key", "scene_id", "roi", "season", "crs", "split")


@dataclass(frozen=True)
class SampleTable:
    """Columns of length N (written samples in dataset order = shard order = Zarr rows).

    Attributes:
        text: field -> (N,) str: key, scene_id, roi, season, crs, split.
        scene, patch: (N,) int32 scene and patch numbers.
        transform: (N, 6) float64 affine coefficients (rasterio order).
        has: modality -> (N,) bool availability; invalid: modality -> (N,) int32 invalid pixels kept.
        has_labels: (N,) bool: the patch has land cover labels.
        label: scheme ('igbp', 'igbp_simple') -> (N,) int16 majority class (0: none).
        multi: scheme -> (N, classes) bool multi-label; fractions: scheme -> (N, classes) float32.
        shard: (N,) int32 index into the written shards (units without a shard are skipped).
        offset, size, crc32c: member ('json', modalities) -> (N,) int64 where its data lies in the shard and
            its CRC-32C; -1 absent (or, for the CRC, unknown: records of an older ingest).
    """

    text: dict[str, np.ndarray]
    scene: np.ndarray
    patch: np.ndarray
    transform: np.ndarray
    has: dict[str, np.ndarray]
    invalid: dict[str, np.ndarray]
    has_labels: np.ndarray
    label: dict[str, np.ndarray]
    multi: dict[str, np.ndarray]
    fractions: dict[str, np.ndarray]
    shard: np.ndarray
    offset: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    crc32c: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.scene)

    def count(self, split: str) -> int:
        return int((self.text["split"] == split).sum())


_SCHEMES = {
    "igbp": (IGBP_CLASSES, "igbp_fractions"),
    "igbp_simple": (IGBP_SIMPLE_CLASSES, "simple_fractions"),
}


def _unit_columns(record: dict, shard_index: int) -> dict[str, np.ndarray]:
    """One unit's samples as columns (flat names)."""
    samples, members = record["samples"], record["members"]
    n = len(samples)
    cols: dict[str, np.ndarray] = {
        f: np.array([s[f] for s in samples], dtype=str) if n else np.zeros(0, "<U1") for f in _TEXT
    }
    cols["scene"] = np.array([s["scene"] for s in samples], dtype=np.int32)
    cols["patch"] = np.array([s["patch"] for s in samples], dtype=np.int32)
    cols["transform"] = np.array([s["transform"] for s in samples], dtype=np.float64).reshape(n, 6)
    for m in MODALITIES:
        cols[f"has_{m}"] = np.array([s["modalities"][m] for s in samples], dtype=bool)
        cols[f"invalid_{m}"] = np.array([s.get(f"{m}_invalid_pixels", 0) for s in samples], dtype=np.int32)
    labels = [s["labels"] for s in samples]
    cols["has_labels"] = np.array([bool(lab) for lab in labels], dtype=bool)
    for scheme, (classes, frac_field) in _SCHEMES.items():
        single = np.zeros(n, np.int16)
        multi = np.zeros((n, len(classes)), bool)
        frac = np.zeros((n, len(classes)), np.float32)
        for i, lab in enumerate(labels):
            if lab:
                single[i] = lab[scheme]
                multi[i, [c - 1 for c in lab[f"{scheme}_multi"]]] = True
                frac[i] = lab[frac_field]
        cols[f"label_{scheme}"], cols[f"multi_{scheme}"], cols[f"fractions_{scheme}"] = single, multi, frac
    cols["shard"] = np.full(n, shard_index, np.int32)
    for m in CATALOG_MEMBERS:
        cols[f"offset_{m}"] = np.array([w[m][0] if m in w else -1 for w in members], dtype=np.int64)
        cols[f"size_{m}"] = np.array([w[m][1] if m in w else -1 for w in members], dtype=np.int64)
        cols[f"crc32c_{m}"] = np.array(
            [w[m][2] if m in w and len(w[m]) > 2 else -1 for w in members], dtype=np.int64
        )
    return cols


def read_sample_table(records: Iterator[dict]) -> tuple[SampleTable, list[dict], list[dict]]:
    """(table, rejects, shards) from unit records in unit order, one record in memory at a time.

    ``shards`` lists the written shards' entries (units whose patches were all rejected have none).
    """
    chunks: list[dict[str, np.ndarray]] = []
    rejects: list[dict] = []
    shards: list[dict] = []
    for record in records:
        rejects += record["rejects"]
        if record["shard"] is None:
            continue
        chunks.append(_unit_columns(record, len(shards)))
        shards.append(record["shard"])
    if not chunks:
        chunks.append(_unit_columns({"samples": [], "members": []}, 0))

    def col(name: str) -> np.ndarray:
        return np.concatenate([c[name] for c in chunks])

    table = SampleTable(
        text={f: col(f) for f in _TEXT},
        scene=col("scene"),
        patch=col("patch"),
        transform=col("transform"),
        has={m: col(f"has_{m}") for m in MODALITIES},
        invalid={m: col(f"invalid_{m}") for m in MODALITIES},
        has_labels=col("has_labels"),
        label={s: col(f"label_{s}") for s in _SCHEMES},
        multi={s: col(f"multi_{s}") for s in _SCHEMES},
        fractions={s: col(f"fractions_{s}") for s in _SCHEMES},
        shard=col("shard"),
        offset={m: col(f"offset_{m}") for m in CATALOG_MEMBERS},
        size={m: col(f"size_{m}") for m in CATALOG_MEMBERS},
        crc32c={m: col(f"crc32c_{m}") for m in CATALOG_MEMBERS},
    )
    return table, rejects, shards


def iter_json(read: Callable[[str], bytes], paths: list[str]) -> Iterator[dict]:
    """The parsed JSON of each path, read lazily (``read(path) -> bytes``)."""
    for path in paths:
        yield json.loads(read(path))


def catalog_of(table: SampleTable) -> Catalog:
    """The loader's catalog: the table's member locations and the facts a loader filters on."""
    return Catalog(
        key=table.text["key"],
        scene_id=table.text["scene_id"],
        shard=table.shard,
        offset=table.offset,
        size=table.size,
        has={m: table.offset[m] >= 0 for m in MODALITY_NAMES},
        train=table.text["split"] == "train",
        label_igbp=table.label["igbp"],
        label_igbp_simple=table.label["igbp_simple"],
        multilabel_igbp_simple=table.multi["igbp_simple"],
        crc32c=table.crc32c,
    )
