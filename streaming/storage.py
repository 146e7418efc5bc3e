"""Where the loader reads shard bytes from: a local folder or an fsspec URL (``s3://...``), one member at a time.

The loader plans which samples to read from ``catalog.npz`` and then asks for single tar members by byte
range, so a sample costs one ``os.pread`` (local) or one ranged GET (remote) and never a walk over tar
headers or a whole-shard read. Optionally, remote shards are downloaded whole into a node-local cache
(``StorageOptions.cache_dir``) shared by every process on the node, and read with ``pread`` from there.

Failure policy: every network request gets the client's own timeouts and *our* retry loop (exponential
backoff with jitter, the client's retries turned off so that the two do not multiply); after the last
attempt a ``StorageError`` names the object. A missing object is not retried. Bytes that disagree with the
manifest (a file shorter than its ``bytes``, a short read, a downloaded shard whose sha256 differs) raise
``CorruptShardError``: retrying cannot fix them.

Endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``
..., honoured by botocore/s3fs), never from code, and are never logged.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CorruptShardError", "ShardReader", "StorageError", "StorageOptions"]

log = logging.getLogger(__name__)

MAX_OPEN_FILES = 64  # shard file descriptors kept open per reader (least recently used are closed)
BACKOFF_CAP_S = 30.0
PREFETCH_WORKERS = 2  # concurrent whole-shard downloads started by prefetch()
TOUCH_EVERY_S = 1.0  # how often a cached shard's mtime is refreshed while it is being read
_HASH_CHUNK = 8 * 2**20
STAT_KEYS = ("requests", "retries", "bytes_read", "cache_hits", "cache_misses", "downloads", "evictions")


class StorageError(RuntimeError):
    """The object store or file is unavailable (after retries, or not found): names the object URL."""


class CorruptShardError(RuntimeError):
    """A shard's bytes disagree with the manifest (truncated, short read, checksum): names the file/URL."""


@dataclass(frozen=True)
class StorageOptions:
    """How shards are fetched.

    Attributes:
        cache_dir: node-local folder for whole-shard copies of a remote dataset (fast local disk, shared by
            every rank and worker on the node); None reads each sample with one ranged GET (its members lie
            together in the shard). A cache pays when epochs re-read the same shards (the whole dataset, or
            a node's share of it, fits on disk); without one, random access costs one request per sample.
            Ignored for local datasets.
        cache_bytes: bound on the size of ``cache_dir`` (all datasets in it); least recently used shards
            are evicted after each download. Leave room for one shard per concurrent download.
        retries: attempts per request after the first failure (0 = fail on the first error).
        backoff_s: first backoff delay; doubles per attempt up to 30 s, each scaled by a random factor in
            [0.5, 1] so that many workers do not retry in lockstep. 5 retries at 0.5 s ride out ~8-15 s
            of outage.
        timeout_s: connect and read timeout of every network request (a read timeout applies per socket
            read, so a whole-shard download may take longer).
        lock_timeout_s: how long a process waits for another one that downloads the shard it needs.
        verify_downloads: check the sha256 of every shard downloaded into the cache against the manifest
            (costs one extra read of the shard from the page cache; the size is always checked).
    """

    cache_dir: str | None = None
    cache_bytes: int = 64 * 2**30
    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 30.0
    lock_timeout_s: float = 600.0
    verify_downloads: bool = True

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.lock_timeout_s <= 0:
            raise ValueError(f"retries, backoff_s must be >= 0 and timeouts > 0, got {self}")
        if self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {self.cache_bytes}")


def backoff_delay(attempt: int, base_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (0-based): base * 2**attempt capped at 30 s, times U[0.5, 1]."""
    return min(BACKOFF_CAP_S, base_s * 2**attempt) * (0.5 + 0.5 * (rng or random).random())


class _OpenFiles:
    """An LRU of open file descriptors with reference counts, so no fd is closed while a thread preads it.

    (Closing an fd in use would let the number be reused by another open: a pread would then return bytes
    of the wrong file.) Entries in use are never evicted; the bound is exceeded while all are in use.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, list] = OrderedDict()  # key -> [fd, refs, closing]

    @contextmanager
    def use(self, key: int, opener: Callable[[], int]) -> Iterator[int]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                self._entries.move_to_end(key)
        if entry is None:
            fd = opener()  # outside the lock: may download a whole shard
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = [fd, 1, False]
                    self._shrink()
                else:  # another thread opened it meanwhile
                    os.close(fd)
                    entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[2] and entry[1] == 0:
                    os.close(entry[0])
                elif len(self._entries) > self.capacity:  # grew past the bound while all were in use
                    self._shrink()

    def discard(self, key: int) -> None:
        """Forget ``key``; its fd is closed now, or by the last thread still using it."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                entry[2] = True
                if entry[1] == 0:
                    os.close(entry[0])

    def close_all(self) -> None:
        for key in list(self._entries):
            self.discard(key)

    def __del__(self) -> None:  # a reader dropped without close() does not leak descriptors
        for fd, refs, _ in list(self._entries.values()):
            if refs == 0:
                with suppress(OSError):
                    os.close(fd)

    def _shrink(self) -> None:
        idle = [k for k, e in self._entries.items() if e[1] == 0]
        for key in idle[: max(0, len(self._entries) - self.capacity)]:
            os.close(self._entries.pop(key)[0])


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
                    raise StorageError(f"{what}: waited {timeout_s:.0f} s for another process downloading it "
                                       f"(lock {path})") from None
                time.sleep(delay)
                delay = min(2 * delay, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _pread_into(fd: int, offset: int, out: memoryview, name: str, shard_bytes: int) -> memoryview:
    """Fill ``out`` from ``offset`` (no allocation: the caller reuses its buffers, avoiding page faults)."""
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], offset + got)
        if n == 0:
            raise CorruptShardError(f"{name}: short read of bytes {offset}-{offset + len(out)} ({got} of {len(out)} "
                                    f"bytes): the file ends before the manifest's {shard_bytes} bytes (truncated)")
        got += n
    return out


def _pread_exact(fd: int, offset: int, size: int, name: str, shard_bytes: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:  # pread may return less than asked (huge reads, signals); empty means end of file
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise CorruptShardError(f"{name}: short read of bytes {offset}-{offset + size} ({got} of {size} bytes): "
                                    f"the file ends before the manifest's {shard_bytes} bytes (truncated)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ShardReader:
    """Reads member bytes of the dataset's shards from a local folder or an fsspec URL (s3://...).

    Thread-safe (DALI calls ``read`` from several threads) and picklable (DALI's parallel external source
    pickles it into spawned workers): file descriptors, the network client and the prefetch threads are
    opened lazily and dropped by pickling, so each process opens its own. ``stats`` counts this process's
    network ``requests`` (local preads are not requests), ``retries``, ``bytes_read`` (member bytes
    returned), per-read ``cache_hits``/``cache_misses``, whole-shard ``downloads`` and ``evictions``.

    Cache sharing: the cache holds ``<cache_dir>/<sha256(dataset URL)[:16]>/shard-NNNNNN.<sha256[:12]>.tar``
    (the content hash in the name means a dataset rewritten at the same URL never serves stale shards).
    Downloads go to a temporary name and appear by ``os.replace``; a per-shard ``flock`` makes one process
    download while the others wait and then reuse the file. Eviction unlinks least recently used shards
    (mtime, refreshed while read); a process that still has an evicted shard open keeps reading it (POSIX:
    an open fd survives unlink; the space is freed when it closes) and notices at its next touch, closes it
    and downloads it again if needed.

    Args:
        dataset: dataset root: a local folder (or ``file://``) or an fsspec URL (``s3://bucket/prefix``).
        shards: the manifest's ``shards`` list ({path, samples, bytes, sha256}); index = catalog ``shard``.
        options: cache, retry and timeout settings.
    """

    def __init__(self, dataset: str, shards: list[dict], options: StorageOptions | None = None):
        self.dataset = str(dataset).rstrip("/")
        self.is_local = "://" not in self.dataset or self.dataset.startswith("file://")
        if self.is_local:
            self.dataset = str(Path(self.dataset.removeprefix("file://")).resolve())
        for i, entry in enumerate(shards):
            if not {"path", "bytes"} <= entry.keys():
                raise ValueError(f"manifest shard {i} of {self.dataset} lacks 'path' or 'bytes': {entry}")
        self.shards = [dict(entry) for entry in shards]
        self.options = options or StorageOptions()
        self._use_cache = self.options.cache_dir is not None and not self.is_local
        if self._use_cache:
            key = hashlib.sha256(self.dataset.encode()).hexdigest()[:16]
            self._cache_root = Path(self.options.cache_dir).resolve()
            self._cache_folder = self._cache_root / key
            self._cache_paths = [self._cache_folder / self._cache_name(e) for e in self.shards]
            self._shard_of_path = {p: i for i, p in enumerate(self._cache_paths)}
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._init_runtime()

    # --- process-local state (not pickled) ---

    def _init_runtime(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._files = _OpenFiles(MAX_OPEN_FILES)
        self._fs = None
        self._fs_root = ""
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[int] = set()
        self._touched: dict[int, float] = {}

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's client, threads and locks are not ours
            self._init_runtime()
            self.stats = dict.fromkeys(STAT_KEYS, 0)

    def __getstate__(self) -> dict:
        keep = ("dataset", "is_local", "shards", "options", "_use_cache", "_cache_root", "_cache_folder",
                "_cache_paths", "_shard_of_path")
        return {k: self.__dict__[k] for k in keep if k in self.__dict__}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stats = dict.fromkeys(STAT_KEYS, 0)  # counts this process's work
        self._init_runtime()

    def __repr__(self) -> str:
        return f"ShardReader({self.dataset!r}, {len(self.shards)} shards, cache={self.options.cache_dir!r})"

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close file descriptors and stop prefetching (a download in progress finishes in the background)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._fs = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._files.close_all()

    # --- public API ---

    def url(self, shard: int) -> str:
        """Where shard ``shard`` lives (a local path or the object URL): used in every error message."""
        return f"{self.dataset}/{self.shards[shard]['path']}"

    def read(self, shard: int, offset: int, size: int, out: bytearray | None = None) -> bytes | memoryview:
        """Exactly ``size`` bytes of shard ``shard`` from byte ``offset`` (a member's data, from the catalog).

        With ``out`` (a reusable buffer of at least ``size`` bytes) the bytes are read into it and a
        memoryview of its first ``size`` bytes is returned: no allocation per read.

        Raises:
            StorageError: the store is unreachable after the retries, or the shard does not exist.
            CorruptShardError: the shard is shorter than the manifest says or its download is corrupt.
            ValueError: the range is outside the shard.
        """
        self._check_process()
        if not 0 <= shard < len(self.shards):
            raise ValueError(f"shard {shard} out of range: {self.dataset} has {len(self.shards)} shards")
        shard_bytes = int(self.shards[shard]["bytes"])
        if offset < 0 or size < 0 or offset + size > shard_bytes:
            raise ValueError(f"bytes {offset}-{offset + size} outside {self.url(shard)} ({shard_bytes} bytes)")
        if size == 0:
            return b""
        target = memoryview(out)[:size] if out is not None else None
        if self.is_local or self._use_cache:
            data = self._read_file(shard, offset, size, target)
        else:
            data = self._retrying(self.url(shard), f"GET bytes {offset}-{offset + size}",
                                  lambda: self._get_range(shard, offset, size))
            if target is not None:
                target[:] = data
                data = target
        self._count(bytes_read=size)
        return data

    def prefetch(self, shards: Sequence[int]) -> None:
        """Start downloading these shards into the cache in the background; a no-op without a cache.

        At most ``PREFETCH_WORKERS`` downloads run at once; failures are logged and left to ``read``.
        """
        self._check_process()
        if not self._use_cache:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREFETCH_WORKERS, thread_name_prefix="eossl-prefetch")
            for shard in shards:
                shard = int(shard)
                if shard in self._inflight or _size_or_none(self._cache_paths[shard]) == self.shards[shard]["bytes"]:
                    continue
                self._inflight.add(shard)
                self._pool.submit(self._prefetch_one, shard)

    # --- reading ---

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, n in increments.items():
                self.stats[key] += n

    def _read_file(self, shard: int, offset: int, size: int, target: memoryview | None = None) -> bytes | memoryview:
        name = str(self._cache_paths[shard]) if self._use_cache else self.url(shard)
        downloaded = False

        def opener() -> int:
            nonlocal downloaded
            if not self._use_cache:
                return self._open_checked(Path(self.url(shard)), shard)
            for _ in range(3):  # another process may evict the shard between the download and the open
                path, downloaded = self._ensure_cached(shard)
                try:
                    return self._open_checked(path, shard)
                except StorageError:
                    continue
            raise StorageError(f"{self.url(shard)}: evicted from the cache {self._cache_folder} faster than it "
                               f"could be opened (cache_bytes={self.options.cache_bytes} too small?)")

        with self._files.use(shard, opener) as fd:
            if target is not None:
                data = _pread_into(fd, offset, target, name, int(self.shards[shard]["bytes"]))
            else:
                data = _pread_exact(fd, offset, size, name, int(self.shards[shard]["bytes"]))
        if self._use_cache:
            self._count(**{"cache_misses" if downloaded else "cache_hits": 1})
            self._touch(shard)
        return data

    def _open_checked(self, path: Path, shard: int) -> int:
        """Open a shard file, checking its size against the manifest (catches truncated copies early)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageError(f"{path}: not found") from None
        except OSError as exc:
            raise StorageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        size, expected = os.fstat(fd).st_size, int(self.shards[shard]["bytes"])
        if size != expected:
            os.close(fd)
            reason = "truncated" if size < expected else "larger than the manifest says"
            raise CorruptShardError(f"{path}: {size} bytes, the manifest says {expected} ({reason})")
        return fd

    def _touch(self, shard: int) -> None:
        """Refresh the cached shard's mtime (the LRU clock); notice when another process evicted it."""
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(shard, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return
            self._touched[shard] = now
        try:
            os.utime(self._cache_paths[shard])
        except FileNotFoundError:  # evicted: drop our fd so its space is freed; the next read downloads
            self._files.discard(shard)

    # --- network ---

    def _filesystem(self):
        with self._lock:
            if self._fs is None:
                import fsspec

                protocol = self.dataset.split("://", 1)[0]
                kwargs: dict = {"skip_instance_cache": True}
                s3 = protocol in ("s3", "s3a")
                if s3:  # timeouts on every request; botocore's retries off (ours wrap every request)
                    kwargs["config_kwargs"] = {"connect_timeout": self.options.timeout_s,
                                               "read_timeout": self.options.timeout_s,
                                               "retries": {"total_max_attempts": 1}}
                fs, self._fs_root = fsspec.core.url_to_fs(self.dataset, **kwargs)
                if s3:
                    fs.retries = 1  # s3fs's own retry loop (a class attribute, not an argument): one attempt
                self._fs = fs
            return self._fs

    def _remote_path(self, shard: int) -> str:
        self._filesystem()
        return f"{self._fs_root}/{self.shards[shard]['path']}"

    def _get_range(self, shard: int, offset: int, size: int) -> bytes:
        fs = self._filesystem()
        self._count(requests=1)
        data = fs.cat_file(self._remote_path(shard), start=offset, end=offset + size)  # one ranged GET
        if len(data) != size:
            raise CorruptShardError(f"{self.url(shard)}: short read of bytes {offset}-{offset + size} "
                                    f"({len(data)} of {size} bytes): the object is shorter than the manifest's "
                                    f"{self.shards[shard]['bytes']} bytes (truncated)")
        return data

    def _retrying(self, url: str, what: str, request: Callable[[], bytes | None]):
        """Run ``request`` with our retry policy; raise StorageError naming ``url`` when it gives up."""
        attempts = self.options.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            try:
                return request()
            except FileNotFoundError as exc:
                raise StorageError(f"{url}: not found ({what})") from exc
            except PermissionError as exc:
                raise StorageError(f"{url}: access denied ({what}): {exc}") from exc
            except (CorruptShardError, StorageError, ValueError, TypeError):
                raise
            except Exception as exc:  # connection refused/reset, timeouts, 5xx, throttling, client errors
                last = exc
                if attempt + 1 < attempts:
                    self._count(retries=1)
                    delay = backoff_delay(attempt, self.options.backoff_s)
                    log.warning("%s: %s failed (%s: %s); retry %d/%d in %.2f s", url, what, type(exc).__name__,
                                exc, attempt + 1, attempts - 1, delay)
                    time.sleep(delay)
        raise StorageError(f"{url}: {what} failed after {attempts} attempts; last error: "
                           f"{type(last).__name__}: {last}") from last

    # --- node-local cache ---

    @staticmethod
    def _cache_name(entry: dict) -> str:
        stem = Path(entry["path"]).name.removesuffix(".tar")
        return f"{stem}.{entry['sha256'][:12]}.tar" if entry.get("sha256") else f"{stem}.tar"

    def _prefetch_one(self, shard: int) -> None:
        try:
            self._ensure_cached(shard)
        except Exception as exc:  # read() retries and raises; prefetch only warms the cache
            log.warning("prefetch of %s failed: %s", self.url(shard), exc)
        finally:
            with self._lock:
                self._inflight.discard(shard)

    def _ensure_cached(self, shard: int) -> tuple[Path, bool]:
        """The cached copy of ``shard``, downloaded (once per node) if absent; True when this call downloaded."""
        path, expected = self._cache_paths[shard], int(self.shards[shard]["bytes"])
        if _size_or_none(path) == expected:
            return path, False
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(path.name + ".lock"), self.options.lock_timeout_s, self.url(shard)):
            if _size_or_none(path) == expected:  # another process downloaded it while we waited
                return path, False
            tmp = path.with_name(path.name + ".tmp")  # only the lock holder writes it: a fixed name is safe
            try:
                self._retrying(self.url(shard), "download", lambda: self._download(shard, tmp))
                self._check_download(shard, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._count(downloads=1)
            with self._lock:
                self._touched[shard] = time.monotonic()
            self._evict(keep=path)
        return path, True

    def _download(self, shard: int, tmp: Path) -> None:
        fs = self._filesystem()
        self._count(requests=1)
        fs.get_file(self._remote_path(shard), str(tmp))  # one streamed GET (parallel ranges if very large)

    def _check_download(self, shard: int, tmp: Path) -> None:
        entry = self.shards[shard]
        size = tmp.stat().st_size
        if size != int(entry["bytes"]):
            raise CorruptShardError(f"{self.url(shard)}: downloaded {size} bytes, the manifest says {entry['bytes']}"
                                    f" ({'truncated' if size < int(entry['bytes']) else 'size mismatch'})")
        if self.options.verify_downloads and entry.get("sha256"):
            digest = _sha256_file(tmp)
            if digest != entry["sha256"]:
                raise CorruptShardError(f"{self.url(shard)}: checksum mismatch: sha256 {digest}, the manifest says "
                                        f"{entry['sha256']}")

    def _evict(self, keep: Path) -> None:
        """Unlink least recently used shards (any dataset in cache_dir) until the folder fits cache_bytes."""
        found = []
        for p in self._cache_root.glob("*/*.tar"):
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
            p.unlink(missing_ok=True)
            total -= size
            self._count(evictions=1)
            if p in self._shard_of_path:  # close our fd so the space is freed now
                self._files.discard(self._shard_of_path[p])
