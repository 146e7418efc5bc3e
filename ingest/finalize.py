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
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES
from .config import default_workers
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
from .sample_table import SampleTable, catalog_of, iter_json, read_sample_table
from .shards import unit_record_path, unit_stats_path
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


def _unit_records(out: DatasetRoot, plan: dict) -> Iterator[dict]:
    """The unit records in unit order, parsed one at a time (all must be committed)."""
    missing = [u for u in range(plan["units"]) if not out.exists(unit_record_path(u))]
    if missing:
        parts = sorted(p.rsplit("/", 1)[-1] for p in out.list(PROGRESS_DIR) if "/part-" in p)
        raise IngestError(
            f"{len(missing)} of {plan['units']} units are not written yet (e.g. unit {missing[0]}); "
            f"finished parts: {', '.join(parts) or 'none'}. Run the missing parts (same command) first."
        )
    return iter_json(out.read_bytes, [unit_record_path(u) for u in range(plan["units"])])


def _merged_stats(out: DatasetRoot, units: int) -> dict[str, BandStats]:
    stats = {m: BandStats.empty(m) for m in ("s1", "s2")}
    for u in range(units):
        with np.load(io.BytesIO(out.read_bytes(unit_stats_path(u)))) as data:
            for mod in stats:
                stats[mod] = stats[mod].merge(BandStats.from_arrays(mod, data, f"{mod}_"))
    return stats


def _label_summary(table: SampleTable) -> dict:
    summary: dict = {"with_labels": int(table.has_labels.sum())}
    summary["without_labels"] = len(table) - summary["with_labels"]
    for scheme, classes in (("igbp", IGBP_CLASSES), ("igbp_simple", IGBP_SIMPLE_CLASSES)):
        labelled = table.has_labels & (table.label[scheme] > 0)
        summary[scheme] = {
            "classes": list(classes),
            "single_label": np.bincount(table.label[scheme][labelled] - 1, minlength=len(classes)).tolist(),
            "multi_label": table.multi[scheme][labelled].sum(0).astype(np.int64).tolist(),
        }
    return summary


def _subsets(table: SampleTable, budgets: list[int], seeds: list[int]) -> tuple[dict, dict, list[str]]:
    """Non-overlapping mask and label-budget index lists (indices are rows in dataset order)."""
    keep = non_overlapping(table.text["scene_id"], table.text["crs"], table.transform)
    train = table.text["split"] == "train"
    test = table.text["split"] == "test"
    labels = table.label["igbp_simple"].astype(np.int64)
    subsets: dict[str, list[int]] = {}
    skipped: list[str] = []
    for b in budgets:
        for seed in seeds:
            name = f"budget_{b}_seed{seed}"
            try:
                subsets[name] = budget_subset(labels, train, b, seed).tolist()
            except ValueError as exc:
                skipped.append(f"{name}: {exc}")
    arrays = {"non_overlapping": keep, "train": train, "test": test}
    return arrays, subsets, skipped


def _write_split_files(out: DatasetRoot, table: SampleTable) -> dict[str, str]:
    """The benchmark's list files: S2 file names per split (sorted as published) and the scenes all of
    whose samples are test, spelled as in the published hold-out list."""
    names = {"train": [], "test": []}
    sides: dict[str, set[str]] = {}
    for key, scene, split in zip(
        table.text["key"].tolist(), table.text["scene_id"].tolist(), table.text["split"].tolist(), strict=True
    ):
        names[split].append(official_patch_name(key))
        sides.setdefault(scene, set()).add(split)
    holdout = sorted(
        (scene for scene, v in sides.items() if v == {"test"}),
        key=lambda sc: (sc.rsplit("_", 1)[0], int(sc.rsplit("_", 1)[1])),
    )
    out.write_bytes(SPLIT_FILES["train"], split_lines(sorted(names["train"])))
    out.write_bytes(SPLIT_FILES["test"], split_lines(sorted(names["test"])))
    out.write_bytes(SPLIT_FILES["holdout_scenes"], split_lines(official_scene_name(sc) for sc in holdout))
    return dict(SPLIT_FILES)


def _split_summary(plan: dict, split_opts: dict, files: dict[str, str]) -> dict:
    """The manifest's account of the split: protocol, scenes per side, and what the lists left out."""
    scenes = plan["splits"]
    info = dict(plan.get("split_lists") or {})
    if not info:
        info["protocol"] = (
            "holdout_scenes" if split_opts.get("holdout_scenes") is not None else "scene_fraction"
        )
    return {
        **info,
        "train_scenes": sorted(s for s, v in scenes.items() if v == "train"),
        "test_scenes": sorted(s for s, v in scenes.items() if v == "test"),
        "mixed_scenes": sorted(s for s, v in scenes.items() if v == "mixed"),
        "files": files,
    }


def finalize(out: DatasetRoot, workers: int, command: tuple[str, ...] | list[str]) -> dict:
    """Write rejects, subsets, Zarr and manifest from the unit records; returns the manifest."""
    from .zarr_store import build_zarr  # noqa: PLC0415 - zarr is only needed here

    plan = _load_plan(out)
    # streamed: one unit record parsed at a time, folded into columns (not ~6 KB of objects per sample)
    table, rejects, shards = read_sample_table(_unit_records(out, plan))
    if plan["patches_found"] != len(table) + len(rejects):
        raise IngestError(
            f"count invariant broken: {plan['patches_found']} patches found but {len(table)} written + "
            f"{len(rejects)} rejected; the progress folder {out.path(PROGRESS_DIR)} is inconsistent"
        )
    options = plan["options"]
    split_opts = options["split"]
    arrays, subsets, skipped = _subsets(table, split_opts["budgets"], split_opts["budget_seeds"])

    out.write_bytes(REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())
    subsets_doc = {
        "order": "row index in the dataset (Zarr rows = shard order)",
        "non_overlapping": np.flatnonzero(arrays["non_overlapping"]).tolist(),
        "train": np.flatnonzero(arrays["train"]).tolist(),
        "test": np.flatnonzero(arrays["test"]).tolist(),
        "budgets": subsets,
        "label": "igbp_simple single-label, stratified; drawn from the train split",
    }
    out.write_bytes(SUBSETS, json.dumps(subsets_doc).encode())
    split_files = _write_split_files(out, table)
    stats = {m: st.summary() for m, st in _merged_stats(out, plan["units"]).items()}
    if "zarr" in options["formats"]:
        extra = {"non_overlapping": arrays["non_overlapping"]}
        for name, idx in subsets.items():
            mask = np.zeros(len(table), dtype=bool)
            mask[idx] = True
            extra[name] = mask
        build_zarr(
            out,
            shards,
            table,
            extra,
            options["zarr_shard_samples"],
            workers,
            {"normalisation": stats, "splits": plan["splits"]},
        )
    catalog = None
    if "wds" in options["formats"]:
        data = catalog_of(table).to_bytes()
        out.write_bytes(CATALOG, data)
        catalog = {"path": CATALOG, "sha256": hashlib.sha256(data).hexdigest()}
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
            "members": {
                "json": "metadata",
                "s1.npy": "float32 VV,VH dB",
                "s2.npy": "uint16 B1..B12 (B8A after B8)",
                "lc.npy": "uint8 IGBP,LCCS_LC,LCCS_LU,LCCS_SH",
            },
        },
        "counts": {
            "patches_found": plan["patches_found"],
            "samples_written": len(table),
            "rejected": len(rejects),
            **{f"with_{m}": int(table.has[m].sum()) for m in ("s1", "s2", "lc")},
            "train": int(arrays["train"].sum()),
            "test": int(arrays["test"].sum()),
            "non_overlapping": int(arrays["non_overlapping"].sum()),
            # Pixels written as stored but kept out of the statistics (see docs/FORMAT.md).
            "invalid_pixels": {m: int(table.invalid[m].astype(np.int64).sum()) for m in ("s1", "s2", "lc")},
        },
        "shards": shards,
        "catalog": catalog,
        "stats": stats,
        "flags": [msg for mod, summary in stats.items() for msg in implausible_spread(mod, summary)],
        "labels": _label_summary(table),
        "splits": _split_summary(plan, split_opts, split_files),
        "subsets": {"budgets": {k: len(v) for k, v in subsets.items()}, "skipped": skipped},
    }
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
