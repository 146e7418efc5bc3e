"""Where the loader reads shard bytes from: a local folder or an fsspec URL (``s3://...``), one member at a
time.

The loader plans which samples to read from ``catalog.npz`` and then asks for single tar members by byte
range, so a sample costs a view of a mapped file or ``os.pread`` calls (local) or one ranged GET (remote)
and never a walk over tar headers or a whole-shard read. Optionally, remote shards are downloaded whole into a
node-local cache (``StorageOptions.cache_dir``, ``shard_cache.py``) shared by every process on the node,
and read from there like a local file.

A file on the node is read in one of two ways: ``read`` copies the bytes into the caller's buffer
(``pread``, in ``READ_CHUNK_BYTES`` pieces each checked as it lands); ``view`` maps the file read-only and
returns the bytes where they lie in the page cache, checked there, so a reader that hands them on (the
loader's reader processes) never copies them (``StorageOptions.map_files``).

Failure policy: every network request gets the client's own timeouts and *our* retry loop (``retry.py``:
exponential backoff with jitter, the client's retries turned off so that the two do not multiply); after
the last attempt a ``StorageError`` names the object. A missing object is not retried. A short or damaged
response (fewer bytes than asked, a member whose CRC-32C differs from the catalog's) is retried like a
network error, since a cut connection or a bad hop passes; bytes that still disagree with the manifest
or the catalog (a local file shorter than its ``bytes``, an object short on every attempt, a downloaded
shard whose sha256 differs, a member failing its CRC-32C after the retries) raise ``CorruptShardError``.

Endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``
..., honoured by botocore/s3fs), never from code, and are never logged.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from eossl.ingest.storage import is_remote, url_scheme

from .retry import RetryPolicy, ShortResponseError, retry
from .shard_cache import ShardCache
from .storage_errors import CorruptShardError, StorageError

__all__ = [
    "READ_CHUNK_BYTES",
    "CorruptShardError",
    "HeldFile",
    "MappedFile",
    "PagesGone",
    "map_pages",
    "ReadCheck",
    "ShardReader",
    "StorageError",
    "StorageOptions",
]

log = logging.getLogger(__name__)

MAX_OPEN_FILES = 64  # shard file descriptors kept open per reader (least recently used are closed)
PREFETCH_WORKERS = 2  # concurrent whole-shard downloads started by prefetch()
READ_CHUNK_BYTES = 256 * 2**10
"""A checked local read is one ``pread`` per this many bytes, each checked right after it lands, while it is
still in the core's cache (a 2 MB member checked after its whole read comes back from memory: ~3x the
checksum's cost); small enough for the L2 cache of current server cores with room for the kernel's copy."""
STAT_KEYS = (
    "requests",
    "retries",
    "bytes_read",
    "cache_hits",
    "cache_misses",
    "reads_while_downloading",
    "downloads",
    "evictions",
)


class ReadCheck(Protocol):
    """What ``ShardReader.read`` checks a read against, fed the read's bytes in order as they arrive (the
    loader's: each member's CRC-32C against the catalog's, ``source.MemberChecksums``)."""

    def begin(self) -> None:
        """A new attempt at the read: forget the bytes fed so far."""

    def update(self, data: memoryview) -> None:
        """The next bytes of the read."""

    def problem(self) -> str | None:
        """What is wrong with the bytes fed since ``begin``, or None."""


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
            read, so a whole-shard download may take longer). A ~2 MB ranged GET gets its first byte from
            S3 in well under a second even when it is busy; 10 s only cuts off a server that has stopped
            answering. Worst case to give up on a stalled server: (retries + 1) x timeout_s + the backoff
            delays, 6 x 10 s + at most 15.5 s = about 76 s at the defaults.
        lock_timeout_s: how long a process waits for another one that downloads the shard it needs.
        verify_downloads: check the sha256 of every shard downloaded into the cache against the manifest
            (costs one extra read of the shard from the page cache; the size is always checked).
        requests_in_flight: ranged GETs a reader process keeps in flight (one per sample of its batch at
            most). One at a time, a reader gets 1 / (latency + transfer) samples/s: ~20/s at a 20 ms
            request latency; 16 in flight make it bound by bandwidth again.
        read_while_downloading: with a node cache, a sample of a shard that is not on the node yet is read
            with a ranged GET while the whole shard downloads in the background, instead of waiting for
            the download (a 256 MB shard takes seconds). The first epoch then does not stall on a new
            shard, for up to twice its bytes; later epochs read the cached copies. Off (default): every
            read waits for its shard's download, which ``lookahead_steps`` started steps earlier; measured
            faster for the first epoch in ``eossl bench loader`` (docs/BENCHMARKS.md), and a node whose
            first epoch is bound by its bandwidth loses by doubling the bytes.
        map_files: read a shard file that is on this node (a local dataset, a cached copy) by mapping it
            into memory (``ShardReader.view``): the loader's reader processes check a member's bytes in
            the page cache and hand the pipeline their place there, so no byte is copied on its way to
            the pipeline, where a ``pread`` copies every byte once more (docs/BENCHMARKS.md). Off: every
            read is a ``pread`` into the batch's shared memory, for file systems where mapping is slow
            (some network file systems) or files that may change while they are read (a mapped file cut
            short is reported when its pages are mapped, ``PagesGone``, but one cut short between that
            and the pipeline's read kills the process that reads it, where a ``pread`` is a short read).
    """

    cache_dir: str | None = None
    cache_bytes: int = 64 * 2**30
    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 10.0
    lock_timeout_s: float = 600.0
    verify_downloads: bool = True
    requests_in_flight: int = 16
    read_while_downloading: bool = False
    map_files: bool = True

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.lock_timeout_s <= 0:
            raise ValueError(f"retries, backoff_s must be >= 0 and timeouts > 0, got {self}")
        if self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {self.cache_bytes}")
        if self.requests_in_flight < 1:
            raise ValueError(f"requests_in_flight must be >= 1, got {self.requests_in_flight}")

    @property
    def retry_policy(self) -> RetryPolicy:
        """The back-off schedule of every network request (``retries``, ``backoff_s``)."""
        return RetryPolicy(retries=self.retries, backoff_s=self.backoff_s)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_populate = [True]  # False once the kernel has refused it


class PagesGone(OSError):
    """Pages of a mapped file are past its end now: the file was cut short after it was mapped."""


def map_pages(memory: mmap.mmap, offset: int, size: int) -> bool:
    """Map the pages of ``memory[offset:offset + size]`` into this process now, in one call (``madvise``
    ``MADV_POPULATE_READ``): half the CPU of taking their page faults as they are first read (64 KiB at a
    time), and a file cut short since it was mapped is an error here (``PagesGone``) instead of a
    ``SIGBUS`` that kills the process at the first read. False where the kernel (< 5.14) cannot, and the
    first read maps them."""
    if not _populate[0] or size <= 0:
        return False
    start = offset - offset % mmap.PAGESIZE
    try:
        memory.madvise(_MADV_POPULATE_READ, start, offset + size - start)
    except OSError as exc:
        if exc.errno == errno.EFAULT:  # what would have been a SIGBUS
            raise PagesGone(errno.EFAULT, f"bytes {offset}-{offset + size} are past the file's end") from None
        _populate[0] = False
        return False
    return True


class HeldFile:
    """A descriptor of this process's own onto an open file (a ``dup``), closed when this object is
    dropped: it keeps the file reachable as ``/proc/<pid>/fd/<fd>`` for as long as someone needs that,
    whatever happens to the descriptor it was made from (the node cache closes a reader's descriptor of a
    copy it evicts)."""

    def __init__(self, fd: int):
        self.fd = os.dup(fd)
        weakref.finalize(self, os.close, self.fd)


@dataclass(frozen=True)
class MappedFile:
    """A shard file mapped read-only into this process (``ShardReader.view``): ``data`` is its bytes in
    place (the mapping ``memory``), from ``address``; the rest is what another process needs to map the
    same file: its ``path``, its identity (``device``, ``inode``: a cached copy can be replaced under the
    same path) and this process's ``pid`` and ``held`` descriptor, through which the file stays reachable
    (``/proc/<pid>/fd/<fd>``) while ``held`` lives, even once it is unlinked."""

    memory: mmap.mmap
    data: memoryview
    address: int
    path: str
    device: int
    inode: int
    pid: int
    held: HeldFile


def _map_file(fd: int, path: str, length: int) -> MappedFile:
    """Map ``length`` bytes of the open file ``fd`` read-only. The mapping lives as long as views of it do:
    dropping the ``MappedFile`` unmaps nothing that an array handed out still points into."""
    memory = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    data = memoryview(memory)
    address = int(np.frombuffer(data, dtype=np.uint8, count=1).__array_interface__["data"][0])
    st = os.fstat(fd)
    return MappedFile(memory, data, address, path, st.st_dev, st.st_ino, os.getpid(), HeldFile(fd))


class _OpenFiles:
    """An LRU of open file descriptors with reference counts, so no fd is closed while a thread preads it.

    (Closing an fd in use would let the number be reused by another open: a pread would then return bytes
    of the wrong file.) Entries in use are never evicted; the bound is exceeded while all are in use. An
    entry may also hold its file's mapping (``mapping``), dropped with the entry.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, list] = OrderedDict()  # key -> [fd, refs, closing, MappedFile]
        self._mapped: list[MappedFile] = []  # mapped since the last ``unmap_all``, evicted ones included

    def acquire(self, key: int, opener: Callable[[], int]) -> list:
        """The entry [fd, refs, closing, mapping] of ``key``, opened by ``opener`` if needed; held (never
        closed or evicted) until ``release``. A pair of calls rather than a context manager: it runs once
        per member read, where a generator-based ``with`` costs as much as the rest of the bookkeeping."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                self._entries.move_to_end(key)
                return entry
        fd = opener()  # outside the lock: may download a whole shard
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [fd, 1, False, None]
                self._shrink()
            else:  # another thread opened it meanwhile
                os.close(fd)
                entry[1] += 1
        return entry

    def release(self, entry: list) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[2] and entry[1] == 0:
                os.close(entry[0])
            elif len(self._entries) > self.capacity:  # grew past the bound while all were in use
                self._shrink()

    def mapping(self, entry: list, path: str, length: int) -> MappedFile:
        """The held ``entry``'s file mapped read-only (mapped at the first call)."""
        with self._lock:
            if entry[3] is None:
                entry[3] = _map_file(entry[0], path, length)
                self._mapped.append(entry[3])
                del self._mapped[: -4 * self.capacity]  # bounded where nobody calls ``unmap_all``
            return entry[3]

    def mapped_files(self) -> list[MappedFile]:
        with self._lock:
            return list(self._mapped)

    def unmap_all(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry[3] = None
            self._mapped.clear()

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._entries

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
        self.unmap_all()

    def __del__(self) -> None:  # a reader dropped without close() does not leak descriptors
        for fd, refs, *_ in list(self._entries.values()):
            if refs == 0:
                with suppress(OSError):
                    os.close(fd)

    def _shrink(self) -> None:
        idle = [k for k, e in self._entries.items() if e[1] == 0]
        for key in idle[: max(0, len(self._entries) - self.capacity)]:
            os.close(self._entries.pop(key)[0])


def _pread_into(
    fd: int, offset: int, out: memoryview, name: str, shard_bytes: int, check: ReadCheck | None = None
) -> memoryview:
    """Fill ``out`` from ``offset`` (no allocation: the caller reuses its buffers, avoiding page faults).
    With ``check``, in ``READ_CHUNK_BYTES`` pieces, each fed to it as soon as it is read."""
    step = READ_CHUNK_BYTES if check is not None else len(out)
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got : got + step]], offset + got)
        if n == 0:
            raise CorruptShardError(
                f"{name}: short read of bytes {offset}-{offset + len(out)} ({got} of {len(out)} "
                f"bytes): the file ends before the manifest's {shard_bytes} bytes (truncated)"
            )
        if check is not None:
            check.update(out[got : got + n])
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
            raise CorruptShardError(
                f"{name}: short read of bytes {offset}-{offset + size} ({got} of {size} bytes): "
                f"the file ends before the manifest's {shard_bytes} bytes (truncated)"
            )
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class ShardReader:
    """Reads member bytes of the dataset's shards from a local folder or an fsspec URL (s3://...).

    Thread-safe (DALI calls ``read`` from several threads) and picklable (DALI's parallel external source
    pickles it into spawned workers): file descriptors, the network client, the cache's bookkeeping and
    the prefetch threads are made lazily and dropped by pickling, so each process makes its own. ``stats``
    counts this process's network ``requests`` (local preads are not requests), ``retries``,
    ``bytes_read`` (member bytes returned), per-read ``cache_hits``/``cache_misses`` and
    ``reads_while_downloading`` (ranged GETs of a shard not yet on the node), whole-shard
    ``downloads`` and ``evictions``. The node-local cache is ``shard_cache.ShardCache``; the retry loop
    is ``retry.retry`` with ``options.retry_policy``.

    Args:
        dataset: dataset root: a local folder (or ``file://``) or an fsspec URL (``s3://bucket/prefix``).
        shards: the manifest's ``shards`` list ({path, samples, bytes, sha256}); index = catalog ``shard``.
        options: cache, retry and timeout settings.
        sleep: waits between retries (tests pass a recording function).
        clock: monotonic seconds of the cache's touch interval (tests pass a fake clock).
    """

    def __init__(
        self,
        dataset: str,
        shards: list[dict],
        options: StorageOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.dataset = str(dataset).rstrip("/")
        self.is_local = not is_remote(self.dataset)
        if self.is_local:
            self.dataset = str(Path(self.dataset.removeprefix("file://")).resolve())
        for i, entry in enumerate(shards):
            if not {"path", "bytes"} <= entry.keys():
                raise ValueError(f"manifest shard {i} of {self.dataset} lacks 'path' or 'bytes': {entry}")
        self.shards = [dict(entry) for entry in shards]
        self.options = options or StorageOptions()
        self._use_cache = self.options.cache_dir is not None and not self.is_local
        self._sleep, self._clock = sleep, clock
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
        self._failed_downloads: set[int] = set()
        self._cache = (
            ShardCache(
                self.dataset,
                self.shards,
                self.options,
                fetch=self._download_retrying,
                count=self._count,
                forget=self._files.discard,
                clock=self._clock,
            )
            if self._use_cache
            else None
        )

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's client, threads and locks are not ours
            self._init_runtime()
            self.stats = dict.fromkeys(STAT_KEYS, 0)

    def __getstate__(self) -> dict:
        keep = ("dataset", "is_local", "shards", "options", "_use_cache", "_sleep", "_clock")
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

    def read(
        self,
        shard: int,
        offset: int,
        size: int,
        out: bytearray | None = None,
        verify: ReadCheck | None = None,
    ) -> bytes | memoryview:
        """Exactly ``size`` bytes of shard ``shard`` from byte ``offset`` (a member's data, from the catalog).

        With ``out`` (a reusable buffer of at least ``size`` bytes) the bytes are read into it and a
        memoryview of its first ``size`` bytes is returned: no allocation per read.

        ``verify`` checks what was read (``ReadCheck``: the loader compares each member's CRC-32C with the
        catalog's), fed a local read's bytes piece by piece as they arrive. A failed check is retried where
        another read can differ: a ranged GET is repeated under the retry policy (a fresh request each
        time); a cached copy is dropped, downloaded again (sha256-checked) and read once more; a local file
        is not re-read.

        Raises:
            StorageError: the store is unreachable after the retries, or the shard does not exist.
            CorruptShardError: the shard is shorter than the manifest says, its download is corrupt, or
                ``verify`` still fails after the retries (the message names the file and the problem).
            ValueError: the range is outside the shard.
        """
        self._check_process()
        self._check_range(shard, offset, size)
        if size == 0:
            return b""
        target = memoryview(out)[:size] if out is not None else None
        if self._use_cache and self.options.read_while_downloading and not self._on_node(shard, waiting=True):
            self.prefetch([shard])  # the whole shard, in the background; this sample comes by a ranged GET
            self._count(reads_while_downloading=1)
            data = self._ranged_read(shard, offset, size, target, verify)
        elif self.is_local or self._use_cache:
            data = self._checked_file(
                lambda: self._read_file(shard, offset, size, target, verify), shard, verify
            )
        else:
            data = self._ranged_read(shard, offset, size, target, verify)
        self._count(bytes_read=size)
        return data

    def view(self, shard: int, offset: int, size: int, verify: ReadCheck | None = None) -> memoryview | None:
        """``read``'s bytes in place, without a copy: a read-only view of the shard's file mapped into memory
        (``options.map_files``), for a shard that is a file on this node (a local dataset; with a node
        cache, a shard waited for like ``read`` does, downloading it first). ``verify`` checks the view
        as ``read`` checks its bytes, a damaged cached copy downloaded again.

        None where the bytes are not in a file here: mapping is off, or a ranged GET would serve ``read``
        (no cache, or ``read_while_downloading`` for a shard still downloading); ``read`` them instead.
        The view, and every array made from it, keeps the mapping alive after the file is closed.
        """
        self._check_process()
        self._check_range(shard, offset, size)
        if not self.options.map_files or not (self.is_local or self._use_cache) or size == 0:
            return None
        if self.options.read_while_downloading and self._use_cache and not self._on_node(shard, waiting=True):
            return None
        data = self._checked_file(lambda: self._map_member(shard, offset, size, verify), shard, verify)
        self._count(bytes_read=size)
        return data

    def mapped_files(self) -> list[MappedFile]:
        """The shard files ``view`` has mapped since the last ``unmap_files`` (the loader's reader: in the
        batch it is reading), including any the node cache has evicted meanwhile."""
        return self._files.mapped_files()

    def unmap_files(self) -> None:
        """Drop every mapping of ``view`` (each is unmapped once no view of it is left); files stay open."""
        self._files.unmap_all()

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
                if shard in self._inflight or self._cache.is_complete(shard):
                    continue
                self._inflight.add(shard)
                self._pool.submit(self._prefetch_one, shard)

    # --- reading ---

    def _check_range(self, shard: int, offset: int, size: int) -> None:
        if not 0 <= shard < len(self.shards):
            raise ValueError(f"shard {shard} out of range: {self.dataset} has {len(self.shards)} shards")
        shard_bytes = int(self.shards[shard]["bytes"])
        if offset < 0 or size < 0 or offset + size > shard_bytes:
            raise ValueError(
                f"bytes {offset}-{offset + size} outside {self.url(shard)} ({shard_bytes} bytes)"
            )

    def _checked_file(self, fetch: Callable[[], bytes | memoryview], shard: int, verify: ReadCheck | None):
        """``fetch()`` from the shard's file, ``verify``'s problem raised as ``CorruptShardError``; a cached
        copy that fails it (damaged on the node's disk after its download check) is downloaded again
        and fetched once more."""
        data = fetch()
        problem = verify.problem() if verify is not None else None
        if problem and self._use_cache:
            log.warning("%s: cached copy fails a check (%s); downloading it again", self.url(shard), problem)
            self._count(retries=1)
            self._cache.discard(shard)
            data = fetch()
            problem = verify.problem()
        if problem:
            name = str(self._cache.paths[shard]) if self._use_cache else self.url(shard)
            raise CorruptShardError(f"{name}: {problem}")
        return data

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, n in increments.items():
                self.stats[key] += n

    def _on_node(self, shard: int, waiting: bool = False) -> bool:
        """Whether the shard can be read from the node cache now (open here, or complete on disk).

        ``waiting``: also True for a shard whose background download failed in this process, so that its
        next read downloads it in the foreground and raises what goes wrong (a full cache disk, say)
        instead of ranged reads going on while failed downloads repeat behind them.
        """
        if waiting and shard in self._failed_downloads:
            return True
        return shard in self._files or self._cache.is_complete(shard)

    def _ranged_read(
        self,
        shard: int,
        offset: int,
        size: int,
        target: memoryview | None,
        verify: ReadCheck | None,
    ) -> bytes | memoryview:
        def request() -> bytes:
            got = self._get_range(shard, offset, size)
            problem = None
            if verify is not None:
                verify.begin()
                verify.update(memoryview(got))
                problem = verify.problem()
            if problem:  # retried (a fresh GET); CorruptShardError when every attempt fails
                raise ShortResponseError(f"{self.url(shard)}: {problem}")
            return got

        data = self._retrying(shard, f"GET bytes {offset}-{offset + size}", request)
        if target is None:
            return data
        target[:] = data
        return target

    def _file_name(self, shard: int) -> str:
        return str(self._cache.paths[shard]) if self._cache is not None else self.url(shard)

    def _acquire_file(self, shard: int) -> tuple[list, bool]:
        """The shard's open-file entry, held (``self._files.release`` it), and whether the shard was
        downloaded into the node cache to open it."""
        downloaded = False

        def opener() -> int:
            nonlocal downloaded
            if self._cache is None:
                return self._open_checked(Path(self.url(shard)), shard)
            for _ in range(3):  # another process may evict the shard between the download and the open
                path, downloaded = self._cache.ensure(shard)
                try:
                    return self._open_checked(path, shard)
                except StorageError:
                    continue
            raise StorageError(
                f"{self.url(shard)}: evicted from the cache {self._cache.folder} faster than "
                f"it could be opened (cache_bytes={self.options.cache_bytes} too small?)"
            )

        entry = self._files.acquire(shard, opener)
        return entry, downloaded

    def _file_read_done(self, shard: int, downloaded: bool) -> None:
        if self._cache is not None:
            self._count(**{"cache_misses" if downloaded else "cache_hits": 1})
            self._cache.touch(shard)

    def _read_file(
        self,
        shard: int,
        offset: int,
        size: int,
        target: memoryview | None = None,
        check: ReadCheck | None = None,
    ) -> bytes | memoryview:
        name, shard_bytes = self._file_name(shard), int(self.shards[shard]["bytes"])
        if check is not None:
            check.begin()
        entry, downloaded = self._acquire_file(shard)
        try:
            if target is not None:
                data = _pread_into(entry[0], offset, target, name, shard_bytes, check)
            else:
                data = _pread_exact(entry[0], offset, size, name, shard_bytes)
                if check is not None:
                    check.update(memoryview(data))
        finally:
            self._files.release(entry)
        self._file_read_done(shard, downloaded)
        return data

    def _map_member(self, shard: int, offset: int, size: int, check: ReadCheck | None) -> memoryview:
        """A view of the member's bytes in the shard's mapping (the file's size was checked at its open, so
        every byte of the range is there), checked."""
        entry, downloaded = self._acquire_file(shard)
        try:
            mapped = self._files.mapping(entry, self._file_name(shard), int(self.shards[shard]["bytes"]))
        finally:
            self._files.release(entry)
        data = mapped.data[offset : offset + size]
        try:
            map_pages(mapped.memory, offset, size)
        except PagesGone:
            raise CorruptShardError(
                f"{self._file_name(shard)}: bytes {offset}-{offset + size} are no longer in the file: it was "
                f"cut short after it was opened (the manifest says {self.shards[shard]['bytes']} bytes)"
            ) from None
        if check is not None:
            check.begin()
            check.update(data)
        self._file_read_done(shard, downloaded)
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

    # --- network ---

    def _filesystem(self):
        with self._lock:
            if self._fs is None:
                import fsspec

                protocol = url_scheme(self.dataset)
                kwargs: dict = {"skip_instance_cache": True}
                s3 = protocol in ("s3", "s3a")
                if s3:  # timeouts on every request; botocore's retries off (ours wrap every request)
                    kwargs["config_kwargs"] = {
                        "connect_timeout": self.options.timeout_s,
                        "read_timeout": self.options.timeout_s,
                        "retries": {"total_max_attempts": 1},
                    }
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
        if len(data) != size:  # a cut body passes; retried, CorruptShardError when it persists
            raise ShortResponseError(
                f"{self.url(shard)}: short read of bytes {offset}-{offset + size} "
                f"({len(data)} of {size} bytes): the object is shorter than the manifest's "
                f"{self.shards[shard]['bytes']} bytes (truncated)"
            )
        return data

    def _retrying(self, shard: int, what: str, request: Callable[[], bytes | None]):
        """Run ``request`` with the options' retry policy; StorageError naming the shard's URL on give-up."""
        return retry(
            request,
            self.options.retry_policy,
            self.url(shard),
            what,
            sleep=self._sleep,
            on_retry=lambda: self._count(retries=1),
        )

    def _download(self, shard: int, tmp: Path) -> None:
        fs = self._filesystem()
        self._count(requests=1)
        fs.get_file(self._remote_path(shard), str(tmp))  # one streamed GET (parallel ranges if very large)

    def _download_retrying(self, shard: int, tmp: Path) -> None:
        self._retrying(shard, "download", lambda: self._download(shard, tmp))

    def _prefetch_one(self, shard: int) -> None:
        try:
            self._cache.ensure(shard)
        except Exception as exc:  # read() retries and raises; prefetch only warms the cache
            log.warning("prefetch of %s failed: %s", self.url(shard), exc)
            with self._lock:
                self._failed_downloads.add(shard)  # its next read waits for its download (_on_node)
        finally:
            with self._lock:
                self._inflight.discard(shard)
