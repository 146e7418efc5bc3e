"""Finish a dataset from its committed units: rejects, subsets, Zarr store and, last, the manifest.

Used by a single-part ingest at its end and by ``eossl ingest merge`` after ``--part i/N`` runs; both
read only the unit records, so a merged dataset is the same as one written by a single run.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES
from .catalog import CATALOG_MEMBERS
from .config import default_workers
from .dali_index import index_path, index_text
from .format import (
    CATALOG,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS_DIR,
    REJECTS,
    SUBSETS,
    WDS_LAYOUT,
    ZARR_DIR,
)
from .integrity import manifest_digest
from .sample_columns import SampleColumns
from .shards import unit_record_path, unit_stats_path
from .source import Source
from .sources import get_source
from .splits import budget_subset, non_overlapping, official_patch_name, official_scene_name, split_lines
from .stats import BandStats, implausible_spread
from .storage import DatasetRoot
from .writer import IngestError

__all__ = ["SPLIT_FILES", "eossl_version", "finalize", "merge", "remove_progress"]

# The split written back out in the SEN12MS benchmark's own formats, so that a result on this dataset
# names the same test patches as published ones (lists hold the samples the dataset has).
SPLIT_FILES = {
    "train": "splits/train_list.txt",
    "test": "splits/test_list.txt",
    "holdout_scenes": "splits/holdout_scenes.txt",
}


def eossl_version() -> str:
    try:
        return version("eossl")
    except PackageNotFoundError:
        return "unknown"


def _load_plan(out: DatasetRoot) -> dict:
    path = f"{PROGRESS_DIR}/plan.json"
    if not out.exists(path):
        raise IngestError(f"{out.path(path)} not found: {out.url} holds no ingest to finish")
    return json.loads(out.read_bytes(path))


def _require_units(out: DatasetRoot, plan: dict) -> None:
    missing = [u for u in range(plan["units"]) if not out.exists(unit_record_path(u))]
    if missing:
        parts = sorted(p.rsplit("/", 1)[-1] for p in out.list(PROGRESS_DIR) if "/part-" in p)
        raise IngestError(
            f"{len(missing)} of {plan['units']} units are not written yet (e.g. unit {missing[0]}); "
            f"finished parts: {', '.join(parts) or 'none'}. Run the missing parts (same command) first."
        )


def _read_units(out: DatasetRoot, plan: dict, source: Source, rejects) -> SampleColumns:
    """Every unit record read in unit order, one at a time: samples into columns, rejects written to the
    open ``rejects`` file. Raises IngestError when the records do not add up to the patches found."""
    columns = SampleColumns.empty(plan["patches_found"], source, zarr="zarr" in plan["options"]["formats"])
    rejected = 0
    for u in range(plan["units"]):
        path = unit_record_path(u)
        record = json.loads(out.read_bytes(path))
        try:
            columns.add_record(record, source, out.path(path))
        except ValueError as exc:
            raise IngestError(f"{exc}; the progress folder {out.path(PROGRESS_DIR)} is inconsistent") from exc
        rejects.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in record["rejects"]).encode())
        rejected += len(record["rejects"])
    if plan["patches_found"] != columns.n + rejected:
        raise IngestError(
            f"count invariant broken: {plan['patches_found']} patches found but {columns.n} written + "
            f"{rejected} rejected; the progress folder {out.path(PROGRESS_DIR)} is inconsistent"
        )
    return columns.trimmed()


def _merged_stats(out: DatasetRoot, units: int, source: Source) -> dict[str, BandStats]:
    tables = source.modalities
    stats = {m: BandStats.empty(m, tables[m]) for m in ("s1", "s2") if m in tables}
    for u in range(units):
        with np.load(io.BytesIO(out.read_bytes(unit_stats_path(u)))) as data:
            for mod in stats:
                stats[mod] = stats[mod].merge(BandStats.from_arrays(mod, data, f"{mod}_", tables[mod]))
    return stats


def _label_summary(columns: SampleColumns, source: Source) -> dict:
    with_labels = int(columns.labelled.sum())
    summary: dict = {"with_labels": with_labels, "without_labels": columns.n - with_labels}
    if source.name != "sen12ms":
        # Multi-label sources (BigEarthNet): per class, the samples that carry it; no majority class.
        for scheme, classes in source.label_schemes.items():
            multi = columns.multi[scheme].sum(axis=0, dtype=np.int64)
            summary[scheme] = {"classes": list(classes), "multi_label": multi.tolist()}
        return summary
    for scheme, classes in (("igbp", IGBP_CLASSES), ("igbp_simple", IGBP_SIMPLE_CLASSES)):
        codes = columns.single[scheme]
        single = np.bincount(codes[codes > 0].astype(np.int64) - 1, minlength=len(classes))
        # Multi-labels are counted for samples with a majority class.
        multi = columns.multi[scheme][codes > 0].sum(axis=0, dtype=np.int64)
        summary[scheme] = {
            "classes": list(classes),
            "single_label": single.tolist(),
            "multi_label": multi.tolist(),
        }
    return summary


def _subsets(
    columns: SampleColumns, budgets: list[int], seeds: list[int], source: Source
) -> tuple[dict, dict, list[str]]:
    """Non-overlapping mask and label-budget index lists (indices are rows in dataset order)."""
    scene, crs = columns.text["scene_id"].values, columns.text["crs"].values
    keep = non_overlapping(scene, crs, columns.transform, source.patch_size)
    train, labels = columns.train, columns.stratum.astype(np.int64)
    subsets: dict[str, list[int]] = {}
    skipped: list[str] = []
    for b in budgets:
        for seed in seeds:
            name = f"budget_{b}_seed{seed}"
            try:
                subsets[name] = budget_subset(labels, train, b, seed).tolist()
            except ValueError as exc:
                skipped.append(f"{name}: {exc}")
    arrays = {"non_overlapping": keep, "train": train, "test": columns.in_split("test")}
    validation = columns.in_split("validation")
    if validation.any():  # a source with an official validation split (reBEN)
        arrays["validation"] = validation
    return arrays, subsets, skipped


def _official_names(keys: np.ndarray) -> np.ndarray:
    """The benchmark's S2 file name of each key (UTF-8 bytes; ``official_patch_name`` adds 7 bytes)."""
    names = np.zeros(len(keys), dtype=f"S{keys.dtype.itemsize + 7}")
    for i, key in enumerate(keys):
        names[i] = official_patch_name(key.decode()).encode()
    return names


def _write_split_files(out: DatasetRoot, columns: SampleColumns) -> dict[str, str]:
    """The benchmark's list files: S2 file names per split (sorted as published) and the scenes all of
    whose samples are test, spelled as in the published hold-out list."""
    keys, train = columns.text["key"].values, columns.train
    for side, mask in (("train", train), ("test", columns.in_split("test"))):
        # Sorted as UTF-8 bytes, which is code point order: the order of Python's sorted() on the names.
        names = np.sort(_official_names(keys[mask]))
        with out.open_atomic(SPLIT_FILES[side]) as f:
            for start in range(0, len(names), 65536):
                f.write(b"".join(name + b"\n" for name in names[start : start + 65536]))
    scenes, scene_of = np.unique(columns.text["scene_id"].values, return_inverse=True)
    trains = np.bincount(scene_of[train], minlength=len(scenes))
    holdout = sorted(
        (scenes[i].decode() for i in np.flatnonzero(trains == 0)),
        key=lambda sc: (sc.rsplit("_", 1)[0], int(sc.rsplit("_", 1)[1])),
    )
    out.write_bytes(SPLIT_FILES["holdout_scenes"], split_lines(official_scene_name(sc) for sc in holdout))
    return dict(SPLIT_FILES)


def _split_summary(plan: dict, split_opts: dict, files: dict[str, str]) -> dict:
    """The manifest's account of the split: protocol, scenes per side, and what the lists left out."""
    scenes = plan["splits"]
    info = dict(plan.get("split_lists") or plan.get("split_table") or {})
    if not info:
        info["protocol"] = (
            "holdout_scenes" if split_opts.get("holdout_scenes") is not None else "scene_fraction"
        )
    summary = {
        **info,
        "train_scenes": sorted(s for s, v in scenes.items() if v == "train"),
        "test_scenes": sorted(s for s, v in scenes.items() if v == "test"),
        "mixed_scenes": sorted(s for s, v in scenes.items() if v == "mixed"),
        "files": files,
    }
    if any(v == "validation" for v in scenes.values()):
        summary["validation_scenes"] = sorted(s for s, v in scenes.items() if v == "validation")
    return summary


def _write_dali_indexes(out: DatasetRoot, columns: SampleColumns) -> None:
    """One DALI index file per shard, from the member offsets of its samples; each shard entry of the
    manifest gets ``dali_index`` (path, sha256, bytes), so the manifest's digest covers them."""
    keys, offset, size = columns.text["key"].values, columns.offset, columns.size
    for shard, rows in columns.shard_rows():
        data = index_text(
            (keys[i].decode(), {m: (offset[m][i], size[m][i]) for m in CATALOG_MEMBERS if offset[m][i] >= 0})
            for i in range(rows.start, rows.stop)
        )
        path = index_path(shard["path"])
        out.write_bytes(path, data)
        shard["dali_index"] = {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_catalog(out: DatasetRoot, columns: SampleColumns) -> dict:
    """Write ``catalog.npz`` straight into its file (no copy of its bytes in memory: ~280 bytes a sample);
    returns its manifest entry, hashed from the written file before it is published."""
    with out.open_atomic(CATALOG) as f:
        columns.catalog().write(f)
        f.flush()
        sha = hashlib.sha256()
        with open(f.name, "rb") as written:  # open_atomic writes a local file first, also for object storage
            for block in iter(lambda: written.read(1 << 20), b""):
                sha.update(block)
    return {"path": CATALOG, "sha256": sha.hexdigest()}


def finalize(out: DatasetRoot, workers: int, command: tuple[str, ...] | list[str]) -> dict:
    """Write rejects, subsets, Zarr and manifest from the unit records; returns the manifest."""
    from .zarr_store import build_zarr  # noqa: PLC0415 - zarr is only needed here

    plan = _load_plan(out)
    source = get_source(plan.get("source_format", "sen12ms"))
    _require_units(out, plan)
    # One pass over the unit records: rejects.jsonl streams out (published only if the counts add up),
    # every sample becomes a row of columns; nothing per sample stays a Python object.
    with out.open_atomic(REJECTS) as rejects:
        columns = _read_units(out, plan, source, rejects)
    n, shards = columns.n, columns.shards
    options = plan["options"]
    split_opts = options["split"]
    arrays, subsets, skipped = _subsets(columns, split_opts["budgets"], split_opts["budget_seeds"], source)

    subsets_doc = {
        "order": "row index in the dataset (Zarr rows = shard order)",
        "non_overlapping": np.flatnonzero(arrays["non_overlapping"]).tolist(),
        "train": np.flatnonzero(arrays["train"]).tolist(),
        "test": np.flatnonzero(arrays["test"]).tolist(),
        **({"validation": np.flatnonzero(arrays["validation"]).tolist()} if "validation" in arrays else {}),
        "budgets": subsets,
        "label": "igbp_simple single-label, stratified; drawn from the train split",
    }
    if source.name != "sen12ms":
        subsets_doc["label"] = (
            f"{', '.join(source.label_schemes) or 'no labels'}: stratified by each sample's lowest class "
            "code; drawn from the train split"
        )
    out.write_bytes(SUBSETS, json.dumps(subsets_doc).encode())
    del subsets_doc
    # The benchmark's list files are SEN12MS's; other sources record their split in the manifest only.
    split_files = _write_split_files(out, columns) if source.name == "sen12ms" else {}
    merged = _merged_stats(out, plan["units"], source)
    stats = {m: st.summary() for m, st in merged.items()}
    if "zarr" in options["formats"]:
        extra = {"non_overlapping": arrays["non_overlapping"]}
        for name, idx in subsets.items():
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
            extra[name] = mask
        build_zarr(
            out,
            shards,
            columns,
            extra,
            options["zarr_shard_samples"],
            workers,
            {"normalisation": stats, "splits": plan["splits"]},
            source,
        )
    catalog = None
    if "wds" in options["formats"]:
        catalog = _write_catalog(out, columns)
        _write_dali_indexes(out, columns)
    else:
        out.remove(f"{PROGRESS_DIR}/staged-shards")
        shards = []

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "eossl_version": eossl_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(command),
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "source_listing_sha256": plan["listing_sha256"],
        "options": options,
        "layout": {
            "encoding": "npy",
            "shards": WDS_LAYOUT,
            "zarr": "CHW",
            "zarr_path": ZARR_DIR if "zarr" in options["formats"] else None,
            "members": _members(source),
        },
        "counts": {
            "patches_found": plan["patches_found"],
            "samples_written": n,
            "rejected": plan["patches_found"] - n,
            **{f"with_{m}": int(columns.has[m].sum()) for m in source.modalities},
            "train": int(arrays["train"].sum()),
            "test": int(arrays["test"].sum()),
            **({"validation": int(arrays["validation"].sum())} if "validation" in arrays else {}),
            "non_overlapping": int(arrays["non_overlapping"].sum()),
            # Pixels written as stored but kept out of the statistics (see docs/FORMAT.md).
            "invalid_pixels": {m: int(columns.invalid[m].sum(dtype=np.int64)) for m in source.modalities},
        },
        "shards": shards,
        "catalog": catalog,
        "stats": stats,
        "flags": [
            msg
            for mod, summary in stats.items()
            for msg in implausible_spread(mod, summary, source.modalities[mod])
        ],
        "labels": _label_summary(columns, source),
        "splits": _split_summary(plan, split_opts, split_files),
        "subsets": {"budgets": {k: len(v) for k, v in subsets.items()}, "skipped": skipped},
    }
    manifest["source"] = source.manifest_fields()
    if "reject_lists" in plan:
        manifest["source"]["reject_lists"] = plan["reject_lists"]
    if "source_listing" in plan:
        manifest["source"]["listing"] = plan["source_listing"]
    manifest["manifest_sha256"] = manifest_digest(manifest)
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    remove_progress(out)
    return manifest


def remove_progress(out: DatasetRoot) -> None:
    """Delete the unit records once the manifest is written: the dataset is final and nothing reads them.

    They hold per-unit 65,536-bin histograms (~73 KB per sample, ~13 GB for all of SEN12MS), needed only
    to resume or merge an unfinished ingest. A run killed between the manifest and this removal leaves
    them behind; the next run of the same command (which finds the manifest) removes them.
    """
    out.remove(PROGRESS_DIR)


def _members(source: Source) -> dict[str, str]:
    """What each tar member holds, in words (SEN12MS's wording kept as it always was)."""
    if source.name == "sen12ms":
        return {
            "json": "metadata",
            "s1.npy": "float32 VV,VH dB",
            "s2.npy": "uint16 B1..B12 (B8A after B8)",
            "lc.npy": "uint8 IGBP,LCCS_LC,LCCS_LU,LCCS_SH",
        }
    return {
        "json": "metadata",
        **{f"{m}.npy": f"{t.dtype} {','.join(t.bands)}" for m, t in source.modalities.items()},
    }


def merge(dataset: str, workers: int | None = None, command: tuple[str, ...] = ()) -> dict:
    """Finish a dataset written by ``--part i/N`` runs (all parts must have completed).

    ``workers`` defaults to :func:`~eossl.ingest.config.default_workers`, as for the ingest itself.
    """
    out = DatasetRoot(dataset)
    if out.exists(MANIFEST) and not out.exists(f"{PROGRESS_DIR}/plan.json"):
        raise IngestError(f"{out.path(MANIFEST)} exists: {out.url} is already a finished dataset")
    plan = _load_plan(out)
    parts = [json.loads(out.read_bytes(p)) for p in out.list(PROGRESS_DIR) if "/part-" in p]
    digests = {p["listing_sha256"] for p in parts} | {plan["listing_sha256"]}
    if len(digests) != 1:
        raise IngestError("the parts scanned different source listings; re-run them against the same SOURCE")
    return finalize(out, default_workers() if workers is None else workers, command)
