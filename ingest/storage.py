"""Where a dataset lives: a local folder or an fsspec URL (``s3://...``), read and written through one
small interface, :class:`DatasetRoot`, by the writer, ``verify``, the loaders and evaluation alike.

Every write is atomic: a local file is written under a temporary name, flushed and renamed; a remote
object is uploaded whole in one PUT. So a killed ingest never leaves a half-written shard or manifest
under its final name. Credentials and endpoints come from the standard environment (``AWS_*``), never
from eossl's code or logs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

__all__ = ["DatasetRoot", "WriteError", "is_remote", "url_scheme"]


def url_scheme(url: str) -> str | None:
    """The scheme of a URL (``"s3"``, ``"gs"``, ``"file"``), None for a plain path.

    The one place that tells a path from a URL, so that every stage agrees on what ``DATASET`` means.
    """
    return url.split("://", 1)[0] if "://" in url else None


def is_remote(url: str) -> bool:
    """True for an object-store URL read through fsspec; a plain path or a ``file://`` URL is local."""
    return url_scheme(url) not in (None, "file")


class WriteError(RuntimeError):
    """A dataset file could not be written (disk full, permissions, network): names the file."""


class DatasetRoot:
    """A dataset root, local or remote, to read from or write into. Paths passed to methods are relative
    ('shards/shard-000000.tar')."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.is_local = not is_remote(url)
        self.storage_options = storage_options or {}
        if self.is_local:
            self.root = Path(url.removeprefix("file://")).resolve()
            self.fs = None
        else:
            # A client of its own: fsspec's instance cache would keep an endpoint read from the environment
            # when another DatasetRoot was made (AWS_ENDPOINT_URL may differ between jobs in one process).
            self.fs, self.root = fsspec.core.url_to_fs(
                self.url, skip_instance_cache=True, **self.storage_options
            )

    def __repr__(self) -> str:
        return f"DatasetRoot({self.url!r})"

    def path(self, rel: str) -> str:
        return str(self.root / rel) if self.is_local else f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return (self.root / rel).exists()
        return self.fs.exists(f"{self.root}/{rel}")

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return (self.root / rel).read_bytes()
        return self.fs.cat_file(f"{self.root}/{rel}")

    def list(self, prefix: str) -> list[str]:
        """Relative paths of the files directly under folder ``prefix`` (sorted)."""
        if self.is_local:
            folder = self.root / prefix
            return (
                sorted(f"{prefix}/{p.name}" for p in folder.iterdir() if p.is_file())
                if folder.is_dir()
                else []
            )
        base = f"{self.root}/{prefix}"
        if not self.fs.exists(base):
            return []
        return sorted(f"{prefix}/{p.rsplit('/', 1)[-1]}" for p in self.fs.ls(base, detail=False))

    def remove(self, rel: str) -> None:
        if self.is_local:
            target = self.root / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        elif self.fs.exists(f"{self.root}/{rel}"):
            self.fs.rm(f"{self.root}/{rel}", recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as f:
            f.write(data)

    @contextmanager
    def open_atomic(self, rel: str) -> Iterator:
        """A binary file that appears under ``rel`` only when the block ends without error."""
        if self.is_local:
            final = self.root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        else:
            tmp_dir = tempfile.mkdtemp(prefix="eossl-upload-")
            tmp = Path(tmp_dir) / Path(rel).name
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if self.is_local:
                os.replace(tmp, final)
            else:
                self.fs.put_file(str(tmp), f"{self.root}/{rel}")
        except OSError as exc:
            raise WriteError(f"cannot write {self.path(rel)}: {exc.strerror or exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
            if not self.is_local:
                shutil.rmtree(tmp.parent, ignore_errors=True)

    def remove_stale_temporaries(self, prefix: str) -> int:
        """Delete temporary files a killed run left in ``prefix`` (local only; S3 has none)."""
        if not self.is_local:
            return 0
        folder = self.root / prefix
        stale = list(folder.glob(".*.tmp-*")) if folder.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def zarr_store(self, rel: str, read_only: bool = False):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(str(self.root / rel), read_only=read_only)
        options = {**self.storage_options, "asynchronous": True}
        return zarr.storage.FsspecStore.from_url(
            f"{self.url}/{rel}", storage_options=options, read_only=read_only
        )
