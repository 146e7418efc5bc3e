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
from .format import CATALOG, MANIFEST
from .storage import DatasetRoot

__all__ = ["DatasetCorruptError", "manifest_digest", "read_catalog", "read_manifest"]

_RECOVER = (
    "re-run the same ingest command into a new folder, or run `eossl verify DATASET` to see what else "
    "is damaged"
)


class DatasetCorruptError(ValueError):
    """A dataset file exists but is not what the ingest wrote (truncated, bit-flipped or replaced)."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is corrupt: {what}; {_RECOVER}")
        self.path = path


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), ``manifest_sha256`` itself left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(out: DatasetRoot) -> dict:
    """The dataset's manifest, checked against its ``manifest_sha256``.

    Raises:
        FileNotFoundError: no manifest (the ingest did not finish).
        DatasetCorruptError: the file does not parse, or its content does not match its digest.
    """
    if not out.exists(MANIFEST):
        raise FileNotFoundError(f"{out.path(MANIFEST)} not found: not a finished eossl dataset")
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
