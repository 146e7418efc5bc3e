"""Fabricated unit records: what ``process_unit`` leaves in ``_progress/`` for finalisation, without GeoTIFFs.

Finalisation reads only the plan, the unit records (JSON) and the unit statistics (.npz), so a dataset of any
size can be finished from records written here: the same fields, spellings and orders the writer writes
(``shards.sample_metadata``, ``shards.process_unit``), with labels, missing modalities, rejects, unit
without samples, overlapping and disjoint patches, for each source format. No shard is written, so only
``--formats wds`` datasets can be finalised from them (the Zarr store reads the shards' members).

Also a script: ``python tests/unit_records.py N`` prints finalisation's peak traced memory for N samples.
"""

from __future__ import annotations

import io
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

from eossl.ingest.format import FORMAT_VERSION, PROGRESS_DIR, WDS_LAYOUT, shard_name
from eossl.ingest.shards import unit_record_path, unit_stats_path
from eossl.ingest.sources import get_source
from eossl.ingest.stats import BandStats
from eossl.ingest.storage import DatasetRoot

__all__ = ["SOURCES", "finalize_peak_bytes", "write_unit_records"]

SOURCES = ("sen12ms", "bigearthnet-mm", "ssl4eo-s12")
_SCENE_PATCHES = 40  # patches per scene / product / location group


def _labels(source: str, rng: np.random.Generator) -> dict | None:
    if source == "ssl4eo-s12" or rng.random() < 0.1:
        return None
    if source == "bigearthnet-mm":
        codes = sorted({int(c) for c in rng.integers(1, 20, size=int(rng.integers(0, 4)))})
        return {"bigearthnet19_multi": codes, "corine": [c * 10 + 1 for c in codes], "unmapped": []}
    igbp = rng.dirichlet(np.ones(17) * 0.3) * (rng.random() > 0.05)
    simple = np.zeros(10)
    np.add.at(simple, np.arange(17) % 10, igbp)
    return {
        "igbp": int(np.argmax(igbp)) + 1 if igbp.sum() else 0,
        "igbp_fractions": [round(float(v), 6) for v in igbp],
        "igbp_multi": [int(i) + 1 for i in np.flatnonzero(igbp >= 0.1)],
        "igbp_simple": int(np.argmax(simple)) + 1 if simple.sum() else 0,
        "igbp_simple_multi": [int(i) + 1 for i in np.flatnonzero(simple >= 0.1)],
        "simple_fractions": [round(float(v), 6) for v in simple],
        "threshold": 0.1,
        "valid_fraction": round(float(igbp.sum()), 6),
    }


def _identity(source: str, i: int) -> tuple[str, str, dict]:
    """(key, scene id, identity fields) of sample number ``i``."""
    group, patch = divmod(i, _SCENE_PATCHES)
    if source == "sen12ms":
        season = ("spring", "summer", "fall", "winter")[group % 4]
        roi = ("ROIs1158", "ROIs1868", "ROIs1970", "ROIs2017")[group % 4]
        scene = group + 1
        return (
            f"{roi}_{season}_{scene}_p{patch}",
            f"{roi}_{season}_{scene}",
            {"roi": roi, "season": season, "scene": scene, "patch": patch},
        )
    if source == "bigearthnet-mm":
        product = f"S2A_MSIL2A_2017{group % 12 + 1:02d}13T1{group:05d}"
        row, col = divmod(patch, 7)
        fields = {"product": product, "season": "summer", "row": row, "col": col}
        return f"{product}_{row}_{col}", product, fields
    location = f"{group:07d}"
    fields = {
        "location": location,
        "s1_acquisition": f"S1A_IW_GRDH_{i:06d}",
        "s2_acquisition": f"2020{patch % 12 + 1:02d}01T1000{i:06d}",
        "season_rank": patch % 4,
    }
    return f"{location}_{patch % 4}_{patch}", location, fields


def _sample(source: str, i: int, split: str, rng: np.random.Generator) -> dict:
    kind = get_source(source)
    key, scene_id, fields = _identity(source, i)
    size = kind.patch_size
    stride = size // 2 if source == "sen12ms" else size  # SEN12MS neighbours overlap by half
    patch = i % _SCENE_PATCHES
    x0 = 500000.0 + (patch % 8) * stride * 10.0 + 0.25 * (i // _SCENE_PATCHES)
    y0 = 7000000.0 - (patch // 8) * stride * 10.0
    have = {m: (m == "s2" or rng.random() > 0.08) for m in kind.modalities}
    meta = {
        "key": key,
        **fields,
        "scene_id": scene_id,
        "crs": f"EPSG:326{31 + (i // _SCENE_PATCHES) % 3}",
        "transform": [10.0, 0.0, x0, 0.0, -10.0, y0],
        "modalities": have,
        "layout": WDS_LAYOUT,
        "dtypes": {m: str(kind.modalities[m].dtype) for m in kind.modalities if have[m]},
        "bands": {m: list(kind.modalities[m].bands) for m in kind.modalities if have[m]},
        **{f"{m}_invalid_pixels": int(rng.integers(0, 3)) * have[m] for m in kind.modalities},
        "labels": _labels(source, rng),
        "split": split,
        "files": {m: f"{scene_id}/{m}/{key}.tif" for m in kind.modalities if have[m]},
        "format_version": FORMAT_VERSION,
    }
    if kind.grid_tolerance_m is None:
        meta["grids"] = {m: {"crs": meta["crs"], "transform": meta["transform"]} for m in have if have[m]}
    return meta


def _unit_stats(source: str, rng: np.random.Generator) -> bytes:
    kind = get_source(source)
    arrays = {}
    for mod in ("s1", "s2"):
        if mod not in kind.modalities:
            continue
        st = BandStats.empty(mod, kind.modalities[mod])
        table = kind.modalities[mod]
        values = rng.uniform(0, 3000, size=(len(table.bands), 4, 4)).astype(table.dtype)
        if mod == "s1":
            values = -rng.uniform(5, 25, size=(len(table.bands), 4, 4)).astype(table.dtype)
        st.update(values)
        arrays.update(st.arrays(f"{mod}_"))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # what np.load reads back from the writer's np.savez
    return buf.getvalue()


def write_unit_records(
    dataset: Path, source: str, samples: int, per_unit: int = 50, seed: int = 0, budgets: tuple = (5, 20)
) -> int:
    """Write the plan, unit records and unit statistics of ``samples`` accepted patches (plus rejects and
    one unit of only rejects) into ``dataset/_progress``; returns the number of units."""
    rng = np.random.default_rng(seed)
    out = DatasetRoot(str(dataset))
    groups = -(-samples // _SCENE_PATCHES)
    scene_ids = sorted({_identity(source, g * _SCENE_PATCHES)[1] for g in range(groups)})
    splits = {s: ("test" if j % 4 == 1 else "train") for j, s in enumerate(scene_ids)}
    units, written, rejected, shard = 0, 0, 0, 0
    while written < samples or units < 2:
        metas, members, rejects = [], [], []
        offset = 0
        for _ in range(0 if units == 1 else min(per_unit, samples - written)):  # unit 1: rejects only
            meta = _sample(source, written, "", rng)
            meta["split"] = splits[meta["scene_id"]]
            where = {}
            for member in ("json", *(m for m in meta["modalities"] if meta["modalities"][m])):
                size = int(rng.integers(500, 5000))
                where[member] = [offset + 512, size, int(rng.integers(0, 2**32))]
                offset += 512 + -(-size // 512) * 512
            metas.append(meta)
            members.append(where)
            written += 1
            if rng.random() < 0.03:
                rejects.append({"key": f"rejected-{units}-{len(rejects)}", "reason": "too many NaN pixels"})
        if units == 1:
            rejects = [{"key": f"rejected-1-{j}", "reason": "s2 missing"} for j in range(2)]
        rejects = [{**r, "errors": [{"file": f"{r['key']}.tif", "reason": r["reason"]}]} for r in rejects]
        info = None
        if metas:
            path = shard_name(shard)
            info = {"path": path, "samples": len(metas), "sha256": f"{shard:064x}", "bytes": offset + 1024}
            shard += 1
        record = {
            "unit": units,
            "patches": len(metas) + len(rejects),
            "shard": info,
            "samples": metas,
            "members": members,
            "rejects": rejects,
        }
        out.write_bytes(unit_record_path(units), json.dumps(record, sort_keys=True).encode())
        out.write_bytes(unit_stats_path(units), _unit_stats(source, rng))
        rejected += len(rejects)
        units += 1
    plan = {
        "listing_sha256": f"{seed:064x}",
        "patches_found": written + rejected,
        "units": units,
        "samples_per_shard": per_unit,
        "options": {
            "formats": ["wds"],
            "read": {"required": ["s2"]},
            "shard_bytes": 256 * 10**6,
            "split": {
                "budget_seeds": [0, 1],
                "budgets": list(budgets),
                "holdout_fraction": 0.25,
                "holdout_scenes": None,
                "seed": 0,
                "split_lists": None,
            },
            "zarr_shard_samples": 64,
        },
        "splits": splits,
    }
    if source != "sen12ms":
        plan["source_format"] = source
    out.write_bytes(f"{PROGRESS_DIR}/plan.json", json.dumps(plan, sort_keys=True, indent=1).encode())
    return units


def finalize_peak_bytes(dataset: Path) -> int:
    """Peak traced Python memory (bytes) of finalising ``dataset`` from its unit records."""
    from eossl.ingest import zarr_store  # noqa: F401, PLC0415 - finalize imports it: not traced as its cost
    from eossl.ingest.finalize import finalize  # noqa: PLC0415 - imported before tracing starts

    tracemalloc.start()
    try:
        finalize(DatasetRoot(str(dataset)), workers=1, command=("measure",))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    import tempfile

    n, source = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "sen12ms"
    with tempfile.TemporaryDirectory() as tmp:
        write_unit_records(Path(tmp) / "ds", source, n, per_unit=100)
        peak = finalize_peak_bytes(Path(tmp) / "ds")
    print(json.dumps({"samples": n, "source": source, "peak_bytes": peak, "bytes_per_sample": peak / n}))
