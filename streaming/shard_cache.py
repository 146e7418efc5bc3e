"""The node-local shard cache: whole-shard copies of a remote dataset, shared by every process on the node.

Layout: ``<cache_dir>/<sha256(dataset URL)[:16]>/shard-NNNNNN.<sha256[:12]>.tar`` (the content hash in the
name means a dataset rewritten at the same URL never serves stale shards). Downloads go to a temporary
name, are checked against the manifest (size always, sha256 unless turned off) and appear by
``os.replace``; a per-shard ``flock`` makes one process download while the others wait and then reuse the
file. A verified copy gets a marker beside it (``<name>.ok``: the sha256 and the copy's inode), so the
full-shard hash is paid once per node and copy: a copy without a valid marker (left by a run with
``verify_downloads`` off, an older eossl, or replaced behind the cache's back) is hashed again before it is
reused, and re-downloaded when it differs. Damage after that (the disk, a stray write) is caught by the
reader's per-member CRC-32C on each read, which drops the copy (``discard``) and downloads it again.

Eviction unlinks least recently used shards (mtime, refreshed by ``touch`` while a shard is read); a
process that still has an evicted shard open keeps reading it (POSIX: an open fd survives unlink; the
space is freed when it closes) and notices at its next touch.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .storage_errors import CorruptShardError, StorageError

if TYPE_CHECKING:
    from .storage import StorageOptions

__all__ = ["TOUCH_EVERY_S", "ShardCache", "cache_name", "marker_path", "size_or_none"]

log = logging.getLogger(__name__)

TOUCH_EVERY_S = 1.0  # how often a cached shard's mtime is refreshed while it is being read
_HASH_CHUNK = 8 * 2**20


@contextmanager
def _file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if absent), waiting at most ``timeout_s``.

    The kernel releases the lock when its holder exits or dies, so a killed downloader never blocks the
    node. Lock files are left in place: deleting one would race with a process that just opened it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"{what}: waited {timeout_s:.0f} s for another process downloading it (lock {path})"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def size_or_none(path: Path) -> int | None:
    """The file's size, None when it does not exist (not yet downloaded, or evicted)."""
    try:
        return path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):  # a part of the path is a file: not there either
        return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def marker_path(path: Path) -> Path:
    """The verified marker beside a cached copy (``<name>.ok``; eviction's ``*.tar`` glob skips it)."""
    return path.with_name(path.name + ".ok")


def cache_name(entry: dict) -> str:
    """The cached file's name of a manifest shard entry: its stem plus the first 12 hex of its sha256."""
    stem = Path(entry["path"]).name.removesuffix(".tar")
    return f"{stem}.{entry['sha256'][:12]}.tar" if entry.get("sha256") else f"{stem}.tar"


class ShardCache:
    """One process's view of the cache folder of one remote dataset (see the module docstring).

    Process-local (threads share it; each process makes its own): it remembers when it last touched each
    shard. What it does to the reader goes through callbacks, so it holds no reference to the reader.

    Args:
        dataset: the dataset URL (its hash names the folder; with ``shards`` it names objects in errors).
        shards: the manifest's ``shards`` list ({path, bytes, sha256}).
        options: ``cache_dir``, ``cache_bytes``, ``lock_timeout_s`` and ``verify_downloads`` are used.
        fetch: ``fetch(shard, tmp)`` downloads the shard to ``tmp`` (with the reader's retries).
        count: ``count(downloads=1)``, ``count(evictions=1)``: the reader's statistics.
        forget: ``forget(shard)`` drops the reader's open fd of a shard that was evicted.
        clock: monotonic seconds; the touch interval is measured with it.
    """

    def __init__(
        self,
        dataset: str,
        shards: list[dict],
        options: StorageOptions,
        fetch: Callable[[int, Path], None],
        count: Callable[..., None],
        forget: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.dataset = dataset
        self.shards = shards
        self.options = options
        self.root = Path(options.cache_dir).resolve()
        self.folder = self.root / hashlib.sha256(dataset.encode()).hexdigest()[:16]
        self.paths = [self.folder / cache_name(e) for e in shards]
        self._shard_of_path = {p: i for i, p in enumerate(self.paths)}
        self._fetch, self._count, self._forget, self._clock = fetch, count, forget, clock
        self._lock = threading.Lock()
        self._touched: dict[int, float] = {}

    def url(self, shard: int) -> str:
        return f"{self.dataset}/{self.shards[shard]['path']}"

    def _must_hash(self, shard: int) -> bool:
        return self.options.verify_downloads and bool(self.shards[shard].get("sha256"))

    def _marker_valid(self, shard: int) -> bool:
        path = self.paths[shard]
        try:
            digest, inode = marker_path(path).read_text().split()
            return digest == self.shards[shard]["sha256"] and int(inode) == path.stat().st_ino
        except (FileNotFoundError, ValueError):
            return False

    def _write_marker(self, shard: int) -> None:
        path = self.paths[shard]
        tmp = path.with_name(path.name + ".ok.tmp")
        tmp.write_text(f"{self.shards[shard]['sha256']} {path.stat().st_ino}\n")
        os.replace(tmp, marker_path(path))

    def is_complete(self, shard: int) -> bool:
        """True when the shard's cached copy exists with the manifest's size and (when downloads are
        verified) a valid verified marker."""
        if size_or_none(self.paths[shard]) != int(self.shards[shard]["bytes"]):
            return False
        return not self._must_hash(shard) or self._marker_valid(shard)

    def discard(self, shard: int) -> None:
        """Drop a cached copy found damaged (its bytes failed a check): the next ``ensure`` downloads it."""
        path = self.paths[shard]
        with _file_lock(path.with_name(path.name + ".lock"), self.options.lock_timeout_s, self.url(shard)):
            marker_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        self._forget(shard)

    def _reuse_unverified(self, shard: int) -> bool:
        """Under the shard's lock: hash a copy of the right size that has no valid marker; keep it (and
        mark it) when it matches the manifest, else remove it. True when it can be reused."""
        path = self.paths[shard]
        if size_or_none(path) != int(self.shards[shard]["bytes"]):
            return False
        if _sha256_file(path) == self.shards[shard]["sha256"]:
            self._write_marker(shard)
            return True
        log.warning(
            "%s: cached copy %s differs from the manifest's sha256; downloading it again",
            self.url(shard),
            path,
        )
        path.unlink(missing_ok=True)
        return False

    def ensure(self, shard: int) -> tuple[Path, bool]:
        """The cached copy of ``shard``, downloaded once per node if absent; True when this call fetched."""
        path = self.paths[shard]
        if self.is_complete(shard):
            return path, False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"{path.parent}: cannot create the cache folder: {exc.strerror or exc}"
            ) from exc
        with _file_lock(path.with_name(path.name + ".lock"), self.options.lock_timeout_s, self.url(shard)):
            if self.is_complete(shard):  # another process downloaded it while we waited
                return path, False
            if self._must_hash(shard) and self._reuse_unverified(shard):
                return path, False
            tmp = path.with_name(path.name + ".tmp")  # only the lock holder writes it: a fixed name is safe
            try:
                self._fetch(shard, tmp)
                self._check_download(shard, tmp)
                marker_path(path).unlink(missing_ok=True)
                os.replace(tmp, path)
                if self._must_hash(shard):
                    self._write_marker(shard)
            finally:
                tmp.unlink(missing_ok=True)
            self._count(downloads=1)
            with self._lock:
                self._touched[shard] = self._clock()
            self._evict(keep=path)
        return path, True

    def touch(self, shard: int) -> None:
        """Refresh the cached shard's mtime (the LRU clock) at most every ``TOUCH_EVERY_S``.

        Notices when another process evicted the shard: the reader's fd is dropped so that its space is
        freed, and the next read downloads it again.
        """
        now = self._clock()
        with self._lock:
            if now - self._touched.get(shard, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return
            self._touched[shard] = now
        try:
            os.utime(self.paths[shard])
        except FileNotFoundError:
            self._forget(shard)

    def _check_download(self, shard: int, tmp: Path) -> None:
        entry = self.shards[shard]
        size = tmp.stat().st_size
        if size != int(entry["bytes"]):
            reason = "truncated" if size < int(entry["bytes"]) else "size mismatch"
            raise CorruptShardError(
                f"{self.url(shard)}: downloaded {size} bytes, the manifest says {entry['bytes']} ({reason})"
            )
        if self.options.verify_downloads and entry.get("sha256"):
            digest = _sha256_file(tmp)
            if digest != entry["sha256"]:
                raise CorruptShardError(
                    f"{self.url(shard)}: checksum mismatch: sha256 {digest}, the manifest "
                    f"says {entry['sha256']}"
                )

    def _evict(self, keep: Path) -> None:
        """Unlink least recently used shards (any dataset in cache_dir) until the folder fits cache_bytes."""
        found = []
        for p in self.root.glob("*/*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            found.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in found)
        for _, size, p in sorted(found):
            if total <= self.options.cache_bytes:
                break
            if p == keep:  # never the shard just downloaded (alone it may exceed the bound)
                continue
            marker_path(p).unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            total -= size
            self._count(evictions=1)
            if p in self._shard_of_path:  # close our fd so the space is freed now
                self._forget(self._shard_of_path[p])
