"""The catalog read once per node and shared by every process on it through memory-mapped ``.npy`` files.

``catalog.npz`` grows with the dataset (45 MB for all of SEN12MS). Read by every rank it costs a GET of
the whole object per rank (2.9 GB at 64 ranks), and held by each reader process (DALI pickles the
per-sample callable into every worker) it costs a private copy per process. Here the first process of a
node that needs it reads it (checked against the manifest's sha256 as always) and writes each array as a
plain ``.npy`` into a node-local folder named by that sha256; every process then maps those files
read-only, so the node holds one copy in the page cache, and a pickled reader carries file names, not
arrays (``detach``/``attach``).

Layout: ``<dir>/catalog-<sha256[:16]>/<array>.npy`` plus ``done`` (written last: a folder without it is
incomplete and is written again). ``<dir>`` is the shard cache folder when there is one, else the system's
temporary folder. One writer at a time per node (an ``flock`` waited on with a timeout).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from eossl.ingest.bands import MODALITY_NAMES
from eossl.ingest.catalog import CATALOG_MEMBERS, Catalog
from eossl.ingest.integrity import read_catalog
from eossl.ingest.storage import DatasetRoot

__all__ = ["MappedFile", "attach", "catalog_folder", "detach", "node_catalog"]

_DONE = "done"


def catalog_folder(manifest: dict, cache_dir: str | None) -> Path:
    """Where this node keeps the dataset's catalog arrays (named by the catalog's sha256)."""
    sha = manifest["catalog"]["sha256"]
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"eossl-{os.getuid()}"
    return base / f"catalog-{sha[:16]}"


def _mapped(folder: Path) -> Catalog:
    def load(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r")

    checked = (folder / "crc32c_json.npy").exists()
    return Catalog(
        key=load("key"),
        scene_id=load("scene_id"),
        shard=load("shard"),
        offset={m: load(f"offset_{m}") for m in CATALOG_MEMBERS},
        size={m: load(f"size_{m}") for m in CATALOG_MEMBERS},
        has={m: load(f"has_{m}") for m in MODALITY_NAMES},
        train=load("train"),
        label_igbp=load("label_igbp"),
        label_igbp_simple=load("label_igbp_simple"),
        multilabel_igbp_simple=load("multilabel_igbp_simple"),
        crc32c={m: load(f"crc32c_{m}") for m in CATALOG_MEMBERS} if checked else None,
    )


def _lock(path: Path, timeout_s: float):
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"{path}: another process has held this lock for {timeout_s:.0f} s while writing the "
                    "node's catalog copy; if none is running, delete the lock file"
                ) from None
            time.sleep(0.05)


def node_catalog(
    out: DatasetRoot, manifest: dict, cache_dir: str | None, timeout_s: float = 600.0
) -> Catalog:
    """The dataset's catalog as read-only memory maps of this node's copy (written on first use).

    A dataset without a recorded catalog digest (or a catalog that fails it) is read as before and the
    error is the same: ``read_catalog`` checks it.
    """
    if not (manifest.get("catalog") or {}).get("sha256"):
        return read_catalog(out, manifest)
    folder = catalog_folder(manifest, cache_dir)
    if (folder / _DONE).exists():
        return _mapped(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder.parent / f"{folder.name}.lock", timeout_s)
    try:
        if not (folder / _DONE).exists():  # the first process of the node: read once, write the arrays
            catalog = read_catalog(out, manifest)
            folder.mkdir(exist_ok=True)
            for name, array in catalog.arrays().items():
                tmp = folder / f".{name}.tmp-{os.getpid()}.npy"
                np.save(tmp, np.ascontiguousarray(array))
                os.replace(tmp, folder / f"{name}.npy")
            (folder / _DONE).write_text(manifest["catalog"]["sha256"])
    finally:
        os.close(fd)
    return _mapped(folder)


class MappedFile:
    """What a pickled memory map becomes: its file, mapped again when unpickled (``attach``)."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def detach(state: dict) -> dict:
    """``state`` with every memory map (also inside dicts) replaced by its file: pickles in bytes, not MB.

    Only maps of whole ``.npy`` files (as ``np.load(mmap_mode=...)`` returns them) are detached; a slice
    of one is an ordinary array and pickles as one.
    """

    def one(value):
        if isinstance(value, np.memmap) and isinstance(value.base, mmap.mmap):  # a whole file's map
            return MappedFile(value.filename)
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value

    return {k: one(v) for k, v in state.items()}


def attach(state: dict) -> dict:
    """The inverse of ``detach``: files mapped again (read-only)."""

    def one(value):
        if isinstance(value, MappedFile):
            return value.load()
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value

    return {k: one(v) for k, v in state.items()}
