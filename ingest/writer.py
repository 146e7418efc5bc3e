"""The ingest driver: plan units, write them in parallel (resumably), and finalize the dataset.

Order of commits, which is what makes a kill at any moment safe:
  1. ``_progress/plan.json``: listing digest + options; a re-run with other options is refused.
  2. per unit: tar shard -> ``unit-N.npz`` statistics -> ``unit-N.json`` record (the commit point).
  3. per part: ``part-i-of-N.json`` once all its units are committed.
  4. finalize (single run, or ``eossl ingest merge``): rejects.jsonl, subsets.json, data.zarr
     (block markers), and ``manifest.json`` last. Only a dataset with a manifest is complete.
  5. ``_progress/`` is deleted: a final dataset needs none of it (a re-run checks its options against
     the manifest instead).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context

import fsspec
from tqdm import tqdm

from .config import IngestConfig
from .format import MANIFEST, PROGRESS_DIR
from .integrity import read_manifest
from .layout import NoPatchesError, SourceListing
from .shards import Unit, process_unit, unit_record_path
from .source import SEN12MS_SOURCE, Source
from .sources import detect_source, get_source, no_source_message
from .splits import patch_list_split, read_patch_list, scene_split, source_split
from .storage import DatasetRoot

__all__ = ["IngestError", "IngestSummary", "plan_units", "run_ingest"]


def full_sample_bytes(source: Source = SEN12MS_SOURCE) -> int:
    """Bytes of one sample with every modality in the shards (+ headers): sets samples per shard."""
    return sum(m.nbytes for m in source.modalities.values()) + 4096


# SEN12MS's triplet (s1 + s2 + lc).
FULL_SAMPLE_BYTES = full_sample_bytes()


class IngestError(RuntimeError):
    """The run could not complete (as opposed to a rejected input, which is reported and skipped)."""


@dataclass
class IngestSummary:
    found: int
    written: int
    rejected: int
    units_done: int
    units_total: int
    complete: bool
    seconds: float

    def line(self) -> str:
        state = "complete" if self.complete else f"part done ({self.units_done}/{self.units_total} units)"
        rate = self.found / self.seconds if self.seconds > 0 else 0.0
        return (
            f"ingest {state}: {self.found} patches found, {self.written} written, {self.rejected} rejected "
            f"({self.seconds:.1f} s, {rate:.1f} patches/s)"
        )


def samples_per_shard(shard_bytes: int, source: Source = SEN12MS_SOURCE) -> int:
    return max(1, shard_bytes // full_sample_bytes(source))


def plan_units(listing: SourceListing, cfg: IngestConfig, source: Source = SEN12MS_SOURCE) -> list[Unit]:
    """Cut the sorted listing into shard-sized units; unit i is shard i, the same in every part."""
    size = samples_per_shard(cfg.shard_bytes, source)
    staging = "wds" not in cfg.formats
    groups = listing.groups
    return [
        Unit(index=u, groups=tuple(groups[s : s + size]), staging=staging)
        for u, s in enumerate(range(0, len(groups), size))
    ]


def _read_split_list(folder: str, stem: str) -> tuple[tuple[str, ...], str]:
    """Keys of ``<folder>/<stem>.txt`` (or ``.pkl``) and the sha256 of the file read."""
    fs, root = fsspec.core.url_to_fs(folder)
    for ext in ("txt", "pkl"):
        path = f"{root.rstrip('/')}/{stem}.{ext}"
        if fs.exists(path):
            data = fs.cat_file(path)
            name = f"{folder.rstrip('/')}/{stem}.{ext}"
            return read_patch_list(data, name), hashlib.sha256(data).hexdigest()
    raise FileNotFoundError(f"split lists folder {folder!r} has no {stem}.txt or {stem}.pkl")


def _split_of_patches(
    listing: SourceListing, cfg: IngestConfig
) -> tuple[dict[str, str], dict, dict[str, str]]:
    """(scene -> split, what the plan records about the split, sample key -> split).

    The scene map is what the manifest and the Zarr attributes list; with published patch lists a
    scene whose patches fall on both sides is 'mixed' there, and the key map decides each sample.
    """
    scenes = [g.pid.scene_id for g in listing.groups]
    official = {g.key: g.meta["split"] for g in listing.groups if "split" in g.meta}
    if official and cfg.split.split_lists is None and cfg.split.holdout_scenes is None:
        # The source's own split (reBEN's table), unless the user chose the test set explicitly.
        by_key, by_scene = source_split([g.key for g in listing.groups], scenes, official)
        per_split = {s: sum(1 for v in official.values() if v == s) for s in sorted(set(official.values()))}
        info = {
            "protocol": "source_table",
            "tables": sorted(listing.notes.get("tables", {})),
            "per_split": per_split,
            "mixed_scenes": sorted(s for s, v in by_scene.items() if v == "mixed"),
        }
        return by_scene, info, by_key
    if cfg.split.split_lists is None:
        by_scene = scene_split(scenes, cfg.split.holdout_fraction, cfg.split.seed, cfg.split.holdout_scenes)
        protocol = "holdout_scenes" if cfg.split.holdout_scenes is not None else "scene_fraction"
        return by_scene, {"protocol": protocol}, {}
    train, train_sha = _read_split_list(cfg.split.split_lists, "train_list")
    test, test_sha = _read_split_list(cfg.split.split_lists, "test_list")
    result = patch_list_split([g.key for g in listing.groups], scenes, train, test)
    info = {
        "protocol": "patch_lists",
        "lists_sha256": {"train_list": train_sha, "test_list": test_sha},
        "listed": {"train": len(train), "test": len(test)},
        "listed_not_found": result.not_found,
        "unlisted": len(result.unlisted),
        "unlisted_examples": list(result.unlisted[:20]),
        "mixed_scenes": result.mixed_scenes,
    }
    if result.mixed_scenes:
        print(
            f"warning: the patch lists put {len(result.mixed_scenes)} scenes on both sides of the split "
            f"(e.g. {', '.join(result.mixed_scenes[:3])}); neighbouring patches overlap, so test pixels "
            "also appear in training (recorded in the manifest)",
            file=sys.stderr,
        )
    if result.unlisted:
        print(
            f"warning: {len(result.unlisted)} patches are in neither split list and go to train "
            f"(e.g. {', '.join(result.unlisted[:3])}; counted in the manifest)",
            file=sys.stderr,
        )
    return result.scenes, info, result.patches


def _unit_splits(unit: Unit, by_scene: dict[str, str], by_key: dict[str, str]) -> dict[str, str]:
    """The split of each sample of ``unit``, keyed by sample key (only what the unit needs is pickled)."""
    return {g.key: by_key.get(g.key) or by_scene[g.pid.scene_id] for g in unit.groups}


def apply_reject_lists(listing: SourceListing, lists: tuple[str, ...]) -> dict[str, dict]:
    """Mark the samples named by the dataset authors' lists of unusable patches as refused.

    A list is a text or CSV file with one sample key (BigEarthNet: the S2 patch name) in the first
    column of each line; the file name says why (``patches_with_seasonal_snow.csv``,
    ``patches_with_cloud_and_shadow.csv``), and the reject reason says so. Returns, per list, its sha256,
    how many keys it names, and how many listed samples the source holds (for the plan).
    """
    info: dict = {"lists": {}}
    reasons: dict[str, str] = {}
    for path in lists:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        name = path.rsplit("/", 1)[-1]
        keys = [line.split(",")[0].strip() for line in data.decode().splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        why = _LIST_REASONS.get(name.rsplit(".", 1)[0], "listed as unusable by the dataset's authors")
        for k in keys:
            reasons.setdefault(k, f"{why} (listed in {name})")
        info["lists"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "listed": len(keys)}
    found = 0
    for g in listing.groups:
        if g.key in reasons and g.reject_reason is None:
            g.reject_reason = reasons[g.key]
            found += 1
    info["listed_and_present"] = found
    return info


_LIST_REASONS = {
    "patches_with_seasonal_snow": "covered by seasonal snow",
    "patches_with_cloud_and_shadow": "covered by clouds or cloud shadows",
}


def _check_plan(out: DatasetRoot, plan: dict) -> None:
    path = f"{PROGRESS_DIR}/plan.json"
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as they come back from the file
    if out.exists(path):
        previous = json.loads(out.read_bytes(path))
        if previous != plan:
            changed = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
            raise IngestError(
                f"{out.path(path)} was written by an ingest with different {', '.join(changed)}; "
                "re-run with the original options or write to a new dataset folder"
            )
    else:
        out.write_bytes(path, json.dumps(plan, sort_keys=True, indent=1).encode())


def _check_final(out: DatasetRoot, plan: dict, manifest: dict) -> None:
    """Refuse a re-run of a finished dataset with other options or another source listing."""
    plan = json.loads(json.dumps(plan))
    recorded = {
        "listing_sha256": manifest["source_listing_sha256"],
        "patches_found": manifest["counts"]["patches_found"],
        "options": manifest["options"],
    }
    changed = sorted(k for k, v in recorded.items() if plan[k] != v)
    if changed:
        raise IngestError(
            f"{out.path(MANIFEST)} records a finished ingest with different {', '.join(changed)}; "
            "re-run with the original options or write to a new dataset folder"
        )


def _run_units(
    units: list[Unit],
    cfg: IngestConfig,
    by_scene: dict[str, str],
    by_key: dict[str, str],
    bar: tqdm,
    source_format: str,
) -> None:
    args = (cfg.dataset, cfg.source, cfg.read)
    if cfg.workers <= 1 or len(units) <= 1:
        for unit in units:
            result = process_unit(unit, *args, _unit_splits(unit, by_scene, by_key), source_format)
            bar.update(result["patches"])
        return
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
        pending = {
            pool.submit(process_unit, unit, *args, _unit_splits(unit, by_scene, by_key), source_format)
            for unit in units
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()
                bar.update(fut.result()["patches"])


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    """Ingest this part of ``cfg.source`` into ``cfg.dataset``; finalize when it is the only part."""
    t0 = time.perf_counter()
    out = DatasetRoot(cfg.dataset)
    source = get_source(cfg.source_format) if cfg.source_format else detect_source(cfg.source)
    listing = source.scan(cfg.source)
    try:
        source.require(listing)  # before anything is written into the dataset folder
    except NoPatchesError as exc:
        if cfg.source_format:
            raise
        raise NoPatchesError(f"{exc}{no_source_message()}") from None
    for warning in listing.notes.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if listing.ignored:
        examples = ", ".join(p.rsplit("/", 1)[-1] for p in listing.ignored[:3])
        print(
            f"warning: ignoring {len(listing.ignored)} files that are not {source.title} patches "
            f"(e.g. {examples})",
            file=sys.stderr,
        )
    listed = apply_reject_lists(listing, cfg.reject_lists)
    units = plan_units(listing, cfg, source)
    splits, split_info, by_key = _split_of_patches(listing, cfg)
    plan = {
        "listing_sha256": listing.digest,
        "patches_found": len(listing.groups),
        "units": len(units),
        "samples_per_shard": samples_per_shard(cfg.shard_bytes, source),
        "options": cfg.plan_options(),
        "splits": splits,
    }
    if source.name != "sen12ms":
        # Recorded only for other sources, so plans of SEN12MS datasets read as they always did.
        plan["source_format"] = source.name
    if cfg.reject_lists:
        plan["reject_lists"] = listed
    if split_info["protocol"] == "patch_lists":
        # Only recorded for list splits, so plans of scene-split datasets read as they always did.
        plan["split_lists"] = split_info
    if split_info["protocol"] == "source_table":
        plan["split_table"] = split_info
    if listing.notes:
        plan["source_listing"] = listing.notes
    if out.exists(MANIFEST):
        # A final dataset: its unit records (and plan.json) are gone; the manifest holds what they decided.
        manifest = read_manifest(out)
        _check_final(out, plan, manifest)
        from .finalize import remove_progress  # noqa: PLC0415 - keeps the unit writer import-light

        remove_progress(out)  # left behind by a run killed right after writing the manifest
        c = manifest["counts"]
        return IngestSummary(
            c["patches_found"],
            c["samples_written"],
            c["rejected"],
            len(units),
            len(units),
            True,
            time.perf_counter() - t0,
        )
    _check_plan(out, plan)
    for prefix in (PROGRESS_DIR, "shards", f"{PROGRESS_DIR}/staged-shards"):
        out.remove_stale_temporaries(prefix)

    i, n = cfg.part
    mine = [u for u in units if u.index % n == i]
    todo = [u for u in mine if not out.exists(unit_record_path(u.index))]
    with tqdm(
        total=sum(len(u.groups) for u in mine),
        initial=sum(len(u.groups) for u in mine if u not in todo),
        unit="patch",
        desc=f"ingest {i}/{n}" if n > 1 else "ingest",
        disable=not cfg.progress,
        file=sys.stderr,
        smoothing=0.1,
    ) as bar:
        _run_units(todo, cfg, splits, by_key, bar, source.name)
    part = {
        "part": [i, n],
        "units": [u.index for u in mine],
        "listing_sha256": listing.digest,
        "command": list(cfg.command),
    }
    out.write_bytes(f"{PROGRESS_DIR}/part-{i}-of-{n}.json", json.dumps(part, sort_keys=True).encode())

    if n == 1:
        from .finalize import finalize  # noqa: PLC0415 - keeps the unit writer import-light in workers

        manifest = finalize(out, cfg.workers, cfg.command)
        c = manifest["counts"]
        return IngestSummary(
            c["patches_found"],
            c["samples_written"],
            c["rejected"],
            len(units),
            len(units),
            True,
            time.perf_counter() - t0,
        )
    written = rejected = 0
    for u in mine:  # one record at a time: a part's records together grow with the dataset
        record = json.loads(out.read_bytes(unit_record_path(u.index)))
        written, rejected = written + len(record["samples"]), rejected + len(record["rejects"])
    return IngestSummary(
        sum(len(u.groups) for u in mine),
        written,
        rejected,
        len(mine),
        len(units),
        False,
        time.perf_counter() - t0,
    )
