"""Read ``manifest.json`` and ``catalog.npz`` back only after checking the digests the writer recorded.

Every reader (streaming, evaluation, ``eossl verify``, a resumed ingest) goes through here, so a
corrupt or truncated file stops with one error that names the file and says how to recover, instead
of a ``BadZipFile`` or a JSON error with no file name, or, worse, a catalog that decodes but points
at the wrong bytes. The manifest's own digest (``manifest_sha256``) covers every other field,
including the catalog's sha256, so checking both chains the catalog to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import zipfile

from .catalog import Catalog
from .format import CATALOG, MANIFEST, PROGRESS_DIR, check_format
from .layout import find_source_files
from .storage import DatasetRoot

__all__ = [
    "DatasetCorruptError",
    "DatasetMissingError",
    "manifest_digest",
    "missing_dataset_reason",
    "read_catalog",
    "read_manifest",
]

_RECOVER = (
    "re-run the same ingest command into a new folder, or run `eossl verify DATASET` to see what else "
    "is damaged"
)


class DatasetCorruptError(ValueError):
    """A dataset file exists but is not what the ingest wrote (truncated, bit-flipped or replaced)."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is corrupt: {what}; {_RECOVER}")
        self.path = path


class DatasetMissingError(FileNotFoundError):
    """A dataset path without a manifest: it does not exist, is a source tree, or an unfinished ingest."""


def _fs_root(out: DatasetRoot):
    if out.is_local:
        import fsspec

        return fsspec.filesystem("file"), str(out.root)
    return out.fs, out.root


def missing_dataset_reason(out: DatasetRoot) -> str:
    """Why ``out`` holds no manifest, in words that say what to do: the one diagnosis ``verify``,
    training and evaluation give for a path that is not a finished dataset."""
    fs, root = _fs_root(out)
    where = out.url
    if not fs.exists(root):
        return f"{where} does not exist (check the path)"
    if not fs.isdir(root):
        return f"{where} is a file, not a dataset folder"
    if out.exists(f"{PROGRESS_DIR}/plan.json"):
        return (
            f"{where} is an unfinished ingest (no {MANIFEST}, which is written last): re-run the same "
            "`eossl ingest` command to resume, or `eossl ingest merge` after --part runs"
        )
    patches, archives = find_source_files(fs, root)
    if patches:
        return (
            f"{where} looks like a SEN12MS source tree (GeoTIFFs such as {patches[0]}), not an eossl "
            f"dataset: run `eossl ingest {where} DATASET` first and pass DATASET"
        )
    if archives:
        return (
            f"{where} holds SEN12MS archives (e.g. {archives[0]}), not an eossl dataset: extract them, "
            f"run `eossl ingest` on the extracted folder, and pass the dataset it writes"
        )
    from .sources import recognised_sources  # noqa: PLC0415 - only on this failure path (reads rasterio)

    found = recognised_sources(fs, root)
    if found:
        return (
            f"{where} looks like a {found[0].title} source tree, not an eossl dataset: run "
            f"`eossl ingest {where} DATASET` first and pass DATASET"
        )
    return f"{where} has no {MANIFEST}: not an eossl dataset (write one with `eossl ingest SOURCE DATASET`)"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), ``manifest_sha256`` itself left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(out: DatasetRoot) -> dict:
    """The dataset's manifest, checked against its ``manifest_sha256`` and its format version.

    Raises:
        DatasetMissingError: no manifest, with why (:func:`missing_dataset_reason`).
        DatasetCorruptError: the file does not parse, or its content does not match its digest.
        UnsupportedFormatError: another format, or a format version this code does not read.
    """
    if not out.exists(MANIFEST):
        raise DatasetMissingError(missing_dataset_reason(out))
    raw = out.read_bytes(MANIFEST)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetCorruptError(out.path(MANIFEST), f"not valid JSON ({len(raw)} bytes, {exc})") from exc
    if not isinstance(manifest, dict):
        raise DatasetCorruptError(out.path(MANIFEST), f"a JSON {type(manifest).__name__}, not an object")
    recorded = manifest.get("manifest_sha256")
    if recorded is not None and manifest_digest(manifest) != recorded:
        raise DatasetCorruptError(out.path(MANIFEST), "its content does not match its manifest_sha256")
    check_format(out.path(MANIFEST), manifest.get("format_version"), manifest.get("format"))
    return manifest


def read_catalog(out: DatasetRoot, manifest: dict) -> Catalog:
    """The dataset's catalog, checked against the sha256 the manifest records for it.

    Raises:
        FileNotFoundError: the dataset has no catalog (ingested without ``--formats wds``).
        DatasetCorruptError: the bytes differ from the recorded sha256, or they do not decode.
    """
    if not out.exists(CATALOG):
        raise FileNotFoundError(f"{out.path(CATALOG)} not found: ingest with --formats wds to stream")
    data = out.read_bytes(CATALOG)
    entry = manifest.get("catalog") or {}
    recorded = entry.get("sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise DatasetCorruptError(out.path(CATALOG), f"its sha256 differs from the one in {MANIFEST}")
    try:
        return Catalog.from_bytes(data)
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as exc:
        raise DatasetCorruptError(
            out.path(CATALOG), f"cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
