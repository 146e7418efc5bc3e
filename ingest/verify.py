"""``eossl verify``: re-check a finished dataset against its manifest.

Checks, in order of cost: the manifest parses and matches its ``manifest_sha256``, counts add up
(found = written + rejected); every listed shard exists with its size and sha256 and no unlisted shard lies
beside them; the shards' sample keys, in order, are the Zarr ``key`` array and their modality members match
the ``has_*`` flags; every DALI index file matches its sha256; with ``deep=True`` every member the catalog
records has its recorded offset and CRC-32C (a damaged member is named by shard, sample and member, even in
a shard whose sha256 already differs), every array in the shards equals its Zarr row bit for bit and every
index file equals the one rebuilt from the catalog's offsets. Last, every band the manifest flags for an
implausible spread is reported: the dataset is whole, but unfit to train on."""

from __future__ import annotations

import hashlib
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from .catalog import member_crc32c
from .dali_index import index_text_from_catalog
from .format import (
    CATALOG,
    MANIFEST,
    REJECTS,
    SHARD_DIR,
    ZARR_DIR,
    UnsupportedFormatError,
    check_format,
    decode_member,
)
from .integrity import DatasetCorruptError, missing_dataset_reason, read_catalog, read_manifest
from .sources import source_of_manifest
from .storage import DatasetRoot

__all__ = ["verify"]


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


@dataclass
class _ShardJob:
    """What one shard is checked against: its manifest entry, first Zarr row and catalog rows."""

    shard: dict
    first_row: int
    deep: bool
    zarr: bool  # compare arrays with the Zarr rows (deep, and the dataset has a Zarr store)
    modalities: tuple[str, ...]  # the dataset's modalities (its source's band tables)
    catalog: dict[str, np.ndarray] | None  # member -> (samples, 3) offset, size, crc32c; None: unchecked


@dataclass
class _ShardResult:
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    members: list[set[str]] = field(default_factory=list)
    unreadable: bool = False  # a sample's format version is not one this code reads
    damaged: list[str] = field(default_factory=list)  # members failing their catalog checksum (deep)


def _check_shard(out_url: str, job: _ShardJob) -> _ShardResult:
    """One pass over one shard: sha256 and size, keys and members, and (deep) catalog offsets and
    every array against its Zarr row. Each shard's bytes are read exactly once."""
    import zarr  # noqa: PLC0415

    out = DatasetRoot(out_url)
    path = job.shard["path"]
    res = _ShardResult()
    if not out.exists(path):
        return _ShardResult(problems=[f"{out.path(path)} missing"])
    group = zarr.open_group(out.zarr_store(ZARR_DIR, read_only=True), mode="r") if job.zarr else None
    zkeys = (
        [str(k) for k in group["key"][job.first_row : job.first_row + job.shard["samples"]]]
        if group is not None
        else []
    )
    found: list[str] = []
    opener = open(out.path(path), "rb") if out.is_local else out.fs.open(f"{out.root}/{path}", "rb")
    with opener as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                key, members, where = None, {}, {}
                for info in tar:
                    if res.unreadable:
                        break
                    k, ext = info.name.split(".", 1)
                    if key is not None and k != key:
                        found += _sample_checks(out, job, res, key, members, where, (group, zkeys))
                        members, where = {}, {}
                    key = k
                    members[ext] = tar.extractfile(info).read()
                    where[ext] = (info.offset_data, info.size)
                if key is not None:
                    found += _sample_checks(out, job, res, key, members, where, (group, zkeys))
        except OSError:
            raise
        except Exception as exc:  # a damaged shard: the sha256 below says so; this is the detail
            found.append(f"{out.path(path)}: not a readable tar ({type(exc).__name__}: {exc})")
        reader.drain()
    if reader.sha.hexdigest() != job.shard["sha256"] or reader.size != job.shard["bytes"]:
        # The rest of this shard's report would follow from the damage; which members it hit is the detail.
        return _ShardResult(
            problems=[
                f"{out.path(path)}: sha256/size differ from the manifest (corrupt or replaced)",
                *res.damaged,
            ]
        )
    res.problems += res.damaged + found
    if len(res.keys) != job.shard["samples"]:
        res.problems.append(
            f"{out.path(path)} holds {len(res.keys)} samples, manifest says {job.shard['samples']}"
        )
    return res


def _sample_checks(
    out: DatasetRoot,
    job: _ShardJob,
    res: _ShardResult,
    key: str,
    members: dict[str, bytes],
    where: dict[str, tuple[int, int]],
    zarr_rows: tuple,
) -> list[str]:
    """Problems of one sample of a shard; records its key and members in ``res``."""
    i = len(res.keys)
    res.keys.append(key)
    res.members.append(set(members))
    path = job.shard["path"]
    problems: list[str] = []
    if job.deep and job.catalog is not None and i < len(job.catalog["json"]):
        rows = {m: r[i] for m, r in job.catalog.items()}
        problems, damaged = _member_checks(out.path(path), key, members, where, rows)
        res.damaged += damaged
    problem = _sample_version_problem(out.path(path), key, members)
    if problem:
        res.unreadable = True  # one report per shard: the rest of it is written by the same version
        return [*problems, problem]
    group, zkeys = zarr_rows
    if group is not None and i < len(zkeys) and zkeys[i] == key:  # a key mismatch is reported once, globally
        row = job.first_row + i
        for mod in job.modalities:
            data = members.get(f"{mod}.npy")
            # Compare bytes, not values: NaN != NaN, and bit-exactness is the claim.
            if data is not None and decode_member(data, "CHW").tobytes() != group[mod][row].tobytes():
                problems.append(f"{key}: {mod} differs between {path} and {ZARR_DIR}")
    return problems


def _member_checks(
    shard: str, key: str, members: dict[str, bytes], where: dict[str, tuple[int, int]], rows: dict
) -> tuple[list[str], list[str]]:
    """One sample's members against the catalog: (offsets that do not point at the member's data in the
    tar, members whose data lacks the recorded CRC-32C, the check training makes on each read). A catalog
    written before checksums were recorded (crc32c -1) has its offsets checked only."""
    problems, damaged = [], []
    for member, (start, size, want) in rows.items():
        start, size, want = int(start), int(size), int(want)
        if start < 0:
            continue
        ext = "json" if member == "json" else f"{member}.npy"
        if where.get(ext) != (start, size):
            problems.append(f"{CATALOG}: {key}.{member} offset does not point at its data in {shard}")
            continue
        got = member_crc32c(members[ext]) if want >= 0 else want
        if got != want:
            damaged.append(
                f"{shard}: {member} member of sample {key} (bytes {start}-{start + size}) fails its "
                f"checksum: crc32c {got:08x}, the catalog says {want:08x}"
            )
    return problems, damaged


def _check_dali_indexes(out: DatasetRoot, manifest: dict, catalog, deep: bool) -> list[str]:
    """Every DALI index file the manifest lists exists with its sha256 and size, none lies unlisted
    beside the shards, and with ``deep`` each equals the index rebuilt from the catalog's offsets."""
    problems = []
    shards = manifest["shards"]
    listed = {s["dali_index"]["path"] for s in shards if s.get("dali_index")}
    extra = sorted(set(p for p in out.list(SHARD_DIR) if p.endswith(".idx")) - listed)
    if extra:
        problems.append(f"DALI index files not listed in the manifest: {', '.join(extra[:5])}")
    catalog = catalog if deep else None  # an unreadable catalog (None) is reported by the catalog check
    for number, shard in enumerate(shards):
        entry = shard.get("dali_index")
        if not entry:
            continue  # written before eossl wrote index files
        path = entry["path"]
        if not out.exists(path):
            problems.append(f"{out.path(path)} missing (DALI index of {shard['path']})")
            continue
        data = out.read_bytes(path)
        if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["bytes"]:
            problems.append(f"{out.path(path)}: sha256/size differ from the manifest (corrupt or replaced)")
        elif catalog is not None and data != index_text_from_catalog(catalog, number):
            problems.append(f"{out.path(path)}: its offsets differ from {CATALOG}'s for {shard['path']}")
    return problems


def _sample_version_problem(shard: str, key: str, members: dict[str, bytes]) -> str | None:
    """A shard sample whose JSON member records a format version this code does not read, or None."""
    try:
        meta = json.loads(members.get("json", b"{}"))
        check_format(f"{shard} ({key}.json)", meta.get("format_version"))
    except (UnsupportedFormatError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return str(exc)
    return None


def verify(dataset: str, deep: bool = False, workers: int = 1) -> list[str]:
    """Return the problems found (empty list: the dataset is complete and consistent).

    Every shard is read once, start to end (hash, keys, members and, with ``deep``, catalog offsets and
    arrays against Zarr in the same pass); ``workers`` processes check shards in parallel.
    """
    import zarr  # noqa: PLC0415

    out = DatasetRoot(dataset)
    if not out.exists(MANIFEST):
        return [missing_dataset_reason(out)]
    try:
        manifest = read_manifest(out)  # its digest, format and version
    except (DatasetCorruptError, UnsupportedFormatError) as exc:
        return [str(exc)]
    problems: list[str] = []
    counts = manifest["counts"]
    if counts["patches_found"] != counts["samples_written"] + counts["rejected"]:
        problems.append(
            f"counts: {counts['patches_found']} found != {counts['samples_written']} written + "
            f"{counts['rejected']} rejected"
        )
    rejects = out.read_bytes(REJECTS).decode().splitlines() if out.exists(REJECTS) else None
    if rejects is None:
        problems.append(f"{out.path(REJECTS)} missing")
    elif len(rejects) != counts["rejected"]:
        problems.append(
            f"{REJECTS} lists {len(rejects)} patches, manifest says {counts['rejected']} rejected"
        )

    formats = manifest["options"]["formats"]
    tables = source_of_manifest(manifest).modalities
    shard_keys: list[str] = []
    shard_members: list[set[str]] = []
    n = counts["samples_written"]
    group, zkeys, zarr_problems = None, [], []
    if "zarr" in formats:
        try:
            group = zarr.open_group(out.zarr_store(ZARR_DIR, read_only=True), mode="r")
            check_format(out.path(ZARR_DIR), group.attrs.get("format_version"), group.attrs.get("format"))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            return [*problems, f"{out.path(ZARR_DIR)} cannot be opened: {exc}"]
        except UnsupportedFormatError as exc:
            return [*problems, str(exc)]
        for mod, m in tables.items():
            if mod not in group or group[mod].shape != (n, *m.shape_chw):
                zarr_problems.append(f"{ZARR_DIR}/{mod} missing or not of shape {(n, *m.shape_chw)}")
        zkeys = [str(k) for k in group["key"][:]] if "key" in group else []
        if len(zkeys) != n:
            zarr_problems.append(f"{ZARR_DIR}/key has {len(zkeys)} entries, expected {n}")

    if "wds" in formats:
        listed = {s["path"] for s in manifest["shards"]}
        extra = sorted(set(p for p in out.list(SHARD_DIR) if p.endswith(".tar")) - listed)
        if extra:
            problems.append(f"shards not listed in the manifest: {', '.join(extra[:5])}")
        if sum(s["samples"] for s in manifest["shards"]) != counts["samples_written"]:
            problems.append("shard sample counts do not add up to samples_written")
        catalog, catalog_problems = _read_catalog(out, manifest)
        firsts = np.cumsum([0] + [s["samples"] for s in manifest["shards"]])
        compare = deep and group is not None and not zarr_problems
        jobs = [
            _ShardJob(
                shard,
                int(first),
                deep,
                compare,
                tuple(tables),
                _catalog_rows(catalog, int(first), shard["samples"]),
            )
            for shard, first in zip(manifest["shards"], firsts[:-1], strict=True)
        ]
        for res in _run_jobs(out.url, jobs, workers):
            problems += res.problems
            shard_keys += res.keys
            shard_members += res.members
        if len(set(shard_keys)) != len(shard_keys):
            problems.append("duplicate sample keys across shards")
        problems += catalog_problems
        if catalog is not None and catalog.key.tolist() != shard_keys:
            problems.append(f"{CATALOG} keys differ from the shards' keys")
        problems += _check_dali_indexes(out, manifest, catalog, deep)

    problems += zarr_problems
    if group is not None and "wds" in formats and not problems:
        if zkeys != shard_keys:
            problems.append("Zarr keys and shard keys differ (order or content)")
        for mod in tables:
            has = group[f"has_{mod}"][:]
            in_tar = np.array([f"{mod}.npy" in m for m in shard_members], dtype=bool)
            if not np.array_equal(has, in_tar):
                problems.append(f"{ZARR_DIR}/has_{mod} disagrees with the shards' {mod} members")
    # Bands whose spread no real scene produces: the files are consistent but the statistics are unusable.
    return problems + [f"{out.path(MANIFEST)} flags {flag}" for flag in manifest.get("flags", [])]


def _read_catalog(out: DatasetRoot, manifest: dict):
    """(catalog or None, problems)."""
    if not manifest.get("catalog") or not out.exists(CATALOG):
        return None, [f"{out.path(CATALOG)} missing"]
    try:
        return read_catalog(out, manifest), []
    except DatasetCorruptError as exc:
        return None, [str(exc)]


def _catalog_rows(catalog, first: int, count: int) -> dict[str, np.ndarray] | None:
    """member -> (count, 3) offset, size, CRC-32C (-1: not recorded) of one shard's samples in the catalog
    (dataset order)."""
    if catalog is None:
        return None
    rows = slice(first, first + count)
    return {
        m: np.stack(
            [
                catalog.offset[m][rows],
                catalog.size[m][rows],
                catalog.crc32c[m][rows] if catalog.crc32c is not None else np.full(count, -1, np.int64),
            ],
            axis=1,
        )
        for m in catalog.offset
    }


def _run_jobs(out_url: str, jobs: list[_ShardJob], workers: int):
    """Shard results in manifest order, ``workers`` shards checked at a time (each in its own process)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _check_shard(out_url, job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_check_shard, [out_url] * len(jobs), jobs)
