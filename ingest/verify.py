"""``eossl verify``: re-check a finished dataset against its manifest.

Checks, in order of cost: the manifest parses and matches its ``manifest_sha256``, counts add up
(found = written + rejected); every listed shard exists with its size and sha256 and no unlisted shard lies
beside them; the shards' sample keys, in order, are the Zarr ``key`` array and their modality members match
the ``has_*`` flags; with ``deep=True`` every array in the shards equals its Zarr row bit for bit. Last, every
band the manifest flags for an implausible spread is reported: the dataset is whole, but unfit to train on.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

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
from .zarr_store import iter_shard_samples

__all__ = ["verify"]


def _sha256(out: DatasetRoot, rel: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    opener = open(out.path(rel), "rb") if out.is_local else out.fs.open(f"{out.root}/{rel}", "rb")
    with opener as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _check_catalog(out: DatasetRoot, manifest: dict, shard_keys: list[str], deep: bool) -> list[str]:
    if not manifest.get("catalog") or not out.exists(CATALOG):
        return [f"{out.path(CATALOG)} missing"]
    try:
        catalog = read_catalog(out, manifest)
    except DatasetCorruptError as exc:
        return [str(exc)]
    if catalog.key.tolist() != shard_keys:
        return [f"{CATALOG} keys differ from the shards' keys"]
    if not deep:
        return []
    problems = []
    shards = manifest["shards"]
    for i in range(len(catalog)):
        path = shards[int(catalog.shard[i])]["path"]
        for member, offsets in catalog.offset.items():
            start, size = int(offsets[i]), int(catalog.size[member][i])
            if start < 0:
                continue
            raw = (
                out.fs.cat_file(f"{out.root}/{path}", start=start, end=start + size)
                if not out.is_local
                else None
            )
            if raw is None:
                with open(out.path(path), "rb") as f:
                    f.seek(start)
                    raw = f.read(size)
            ok = raw.startswith(b"{") if member == "json" else raw.startswith(b"\x93NUMPY")
            if not ok or len(raw) != size:
                problems.append(
                    f"{CATALOG}: {catalog.key[i]}.{member} offset does not point at its data in {path}"
                )
    return problems


def _sample_version_problem(shard: str, key: str, members: dict[str, bytes]) -> str | None:
    """A shard sample whose JSON member records a format version this code does not read, or None."""
    try:
        meta = json.loads(members.get("json", b"{}"))
        check_format(f"{shard} ({key}.json)", meta.get("format_version"))
    except (UnsupportedFormatError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return str(exc)
    return None


def verify(dataset: str, deep: bool = False) -> list[str]:
    """Return the problems found (empty list: the dataset is complete and consistent)."""
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
    shard_keys: list[str] = []
    shard_members: list[set[str]] = []
    if "wds" in formats:
        listed = {s["path"] for s in manifest["shards"]}
        extra = sorted(set(p for p in out.list(SHARD_DIR) if p.endswith(".tar")) - listed)
        if extra:
            problems.append(f"shards not listed in the manifest: {', '.join(extra[:5])}")
        if sum(s["samples"] for s in manifest["shards"]) != counts["samples_written"]:
            problems.append("shard sample counts do not add up to samples_written")
        for shard in manifest["shards"]:
            path = shard["path"]
            if not out.exists(path):
                problems.append(f"{out.path(path)} missing")
                continue
            digest, size = _sha256(out, path)
            if digest != shard["sha256"] or size != shard["bytes"]:
                problems.append(
                    f"{out.path(path)}: sha256/size differ from the manifest (corrupt or replaced)"
                )
                continue
            keys = []
            for k, members in iter_shard_samples(out, path):
                keys.append((k, set(members)))
                problem = _sample_version_problem(out.path(path), k, members)
                if problem:
                    problems.append(problem)
                    break
            if len(keys) != shard["samples"]:
                problems.append(
                    f"{out.path(path)} holds {len(keys)} samples, manifest says {shard['samples']}"
                )
            shard_keys += [k for k, _ in keys]
            shard_members += [m for _, m in keys]
        if len(set(shard_keys)) != len(shard_keys):
            problems.append("duplicate sample keys across shards")
        problems += _check_catalog(out, manifest, shard_keys, deep)

    if "zarr" in formats:
        try:
            group = zarr.open_group(out.zarr_store(ZARR_DIR, read_only=True), mode="r")
        except (FileNotFoundError, ValueError, KeyError) as exc:
            return [*problems, f"{out.path(ZARR_DIR)} cannot be opened: {exc}"]
        try:
            check_format(out.path(ZARR_DIR), group.attrs.get("format_version"), group.attrs.get("format"))
        except UnsupportedFormatError as exc:
            return [*problems, str(exc)]
        n = counts["samples_written"]
        tables = source_of_manifest(manifest).modalities
        for mod, m in tables.items():
            if mod not in group or group[mod].shape != (n, *m.shape_chw):
                problems.append(f"{ZARR_DIR}/{mod} missing or not of shape {(n, *m.shape_chw)}")
        zkeys = [str(k) for k in group["key"][:]] if "key" in group else []
        if len(zkeys) != n:
            problems.append(f"{ZARR_DIR}/key has {len(zkeys)} entries, expected {n}")
        if "wds" in formats and not problems:
            if zkeys != shard_keys:
                problems.append("Zarr keys and shard keys differ (order or content)")
            for mod in tables:
                has = group[f"has_{mod}"][:]
                in_tar = np.array([f"{mod}.npy" in m for m in shard_members], dtype=bool)
                if not np.array_equal(has, in_tar):
                    problems.append(f"{ZARR_DIR}/has_{mod} disagrees with the shards' {mod} members")
        if deep and "wds" in formats and not problems:
            row = 0
            for shard in manifest["shards"]:
                for key, members in iter_shard_samples(out, shard["path"]):
                    for mod in tables:
                        data = members.get(f"{mod}.npy")
                        if data is None:
                            continue
                        # Compare bytes, not values: NaN != NaN, and bit-exactness is the claim.
                        if decode_member(data, "CHW").tobytes() != group[mod][row].tobytes():
                            problems.append(f"{key}: {mod} differs between {shard['path']} and {ZARR_DIR}")
                    row += 1
    # Bands whose spread no real scene produces: the files are consistent but the statistics are unusable.
    return problems + [f"{out.path(MANIFEST)} flags {flag}" for flag in manifest.get("flags", [])]
