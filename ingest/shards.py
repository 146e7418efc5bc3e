"""Write one unit of work: a run of patches read, validated and packed into one WebDataset tar shard.

A unit is the writer's commit: its tar, its statistics (.npz) and its record (.json, written last)
appear atomically, so a killed ingest resumes by skipping units whose record exists. Tars are written
with the standard library so they are byte-for-byte deterministic (fixed mtime, owner, order): the
same input gives the same sha256, which is what makes ``--part`` + merge checkable against one run.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from .catalog import member_crc32c
from .format import (
    FORMAT_VERSION,
    PROGRESS_DIR,
    SHARD_DIR,
    WDS_LAYOUT,
    encode_member,
    member_name,
    shard_name,
)
from .layout import PatchGroup
from .read import ReadOptions, Reject, Sample
from .source import SEN12MS_SOURCE, Source
from .sources import get_source
from .stats import BandStats
from .storage import DatasetRoot

__all__ = ["Unit", "process_unit", "sample_metadata", "unit_record_path", "unit_stats_path"]


@dataclass(frozen=True)
class Unit:
    """Patches [start, stop) of the sorted listing, written as shard number ``index``."""

    index: int
    groups: tuple[PatchGroup, ...]
    staging: bool  # tar goes to the progress folder (zarr-only datasets) instead of shards/


def unit_record_path(index: int) -> str:
    return f"{PROGRESS_DIR}/unit-{index:06d}.json"


def unit_stats_path(index: int) -> str:
    return f"{PROGRESS_DIR}/unit-{index:06d}.npz"


def unit_shard_path(unit: Unit) -> str:
    name = shard_name(unit.index)
    return name.replace(SHARD_DIR, f"{PROGRESS_DIR}/staged-shards", 1) if unit.staging else name


def _relative(path: str, source: str) -> str:
    src = source.rstrip("/")
    for prefix in (src + "/", src.split("://", 1)[-1] + "/"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def sample_metadata(
    sample: Sample, group: PatchGroup, split: str, source: str, kind: Source = SEN12MS_SOURCE
) -> dict:
    """The JSON member of a sample: identity, georeference, availability, labels, split, provenance.

    ``kind`` is the source collection: its identity fields and band tables (``source`` is the URL).
    """
    pid = group.pid
    tables = kind.modalities
    return {
        "key": sample.key,
        **pid.metadata(),
        "scene_id": pid.scene_id,
        "crs": sample.crs,
        "transform": list(sample.transform),
        "modalities": {m: m in sample.arrays for m in tables},
        "layout": WDS_LAYOUT,
        "dtypes": {m: str(a.dtype) for m, a in sample.arrays.items()},
        "bands": {m: list(tables[m].bands) for m in sample.arrays},
        **{f"{m}_invalid_pixels": sample.invalid_pixels(m) for m in tables},
        "labels": sample.labels.to_json() if sample.labels is not None else None,
        "split": split,
        "files": {m: _relative(p, source) for m, p in sample.files.items()},
        "format_version": FORMAT_VERSION,
        # Each modality's own grid, for sources whose modalities are paired by rule, not by grid.
        **({"grids": sample.grids} if sample.grids else {}),
    }


class _HashingWriter(io.RawIOBase):
    """Write-through file wrapper that hashes and counts what passes (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> list[int]:
    """Append one member; return [offset, size, crc32c] of its data in the tar.

    Readers seek straight to the data with offset and size, and check what they read against the CRC-32C
    (``catalog.member_crc32c``: fast enough to check every sample as it is read, unlike the shard's sha256,
    which needs the whole file).
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return [data_offset, len(data), member_crc32c(data)]


def process_unit(
    unit: Unit,
    out_url: str,
    source: str,
    read_options: ReadOptions,
    splits: dict[str, str],
    source_format: str = "sen12ms",
) -> dict:
    """Read, validate and write one unit; return its record (also stored as JSON).

    ``splits`` maps each sample key of the unit to its split ('train' or 'test'); ``source_format``
    names the source collection (``sources.get_source``) that reads the unit's groups.
    """
    out = DatasetRoot(out_url)
    kind = get_source(source_format)
    stats = {m: BandStats.empty(m, kind.modalities[m]) for m in ("s1", "s2") if m in kind.modalities}
    samples: list[dict] = []
    members: list[dict[str, list[int]]] = []  # per sample: member -> [offset, size, crc32c] in the tar
    rejects: list[dict] = []
    shard = unit_shard_path(unit)
    shard_info = None
    # Stream patch by patch (a unit is ~100 patches, 250 MB): the tar is opened at the first accepted
    # patch, so a unit of rejects writes no empty shard.
    with ExitStack() as stack:
        writer = tar = None
        for group in unit.groups:
            result = kind.read(group, read_options)
            if isinstance(result, Reject):
                rejects.append(result.to_json())
                continue
            if tar is None:
                writer = _HashingWriter(stack.enter_context(out.open_atomic(shard)))
                tar = stack.enter_context(tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT))
            meta = sample_metadata(result, group, splits[group.key], source, kind)
            where = {
                "json": _add_member(tar, f"{result.key}.json", json.dumps(meta, sort_keys=True).encode())
            }
            for mod, arr in result.arrays.items():
                where[mod] = _add_member(tar, f"{result.key}.{member_name(mod)}", encode_member(arr))
                if mod in stats:
                    stats[mod].update(arr, valid=~result.invalid[mod])
            samples.append(meta)
            members.append(where)
        if tar is not None:
            tar.close()  # writes the end-of-archive blocks before the hash is read
            shard_info = {
                "path": shard,
                "samples": len(samples),
                "sha256": writer.sha.hexdigest(),
                "bytes": writer.size,
            }
    arrays: dict[str, np.ndarray] = {}
    for mod, st in stats.items():
        arrays.update(st.arrays(f"{mod}_"))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.write_bytes(unit_stats_path(unit.index), buf.getvalue())
    record = {
        "unit": unit.index,
        "patches": len(unit.groups),
        "shard": shard_info,
        "samples": samples,
        "members": members,
        "rejects": rejects,
    }
    out.write_bytes(unit_record_path(unit.index), json.dumps(record, sort_keys=True).encode())
    return {
        "unit": unit.index,
        "patches": len(unit.groups),
        "written": len(samples),
        "rejected": len(rejects),
    }
