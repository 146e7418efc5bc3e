"""Shard storage of the streaming loader: local pread, ranged GETs on S3, the node-local cache, faults.

Real shards written by the real ``eossl ingest``; real ``moto_server`` processes: one per module with
request recording on (so tests count the HTTP requests the server actually received), and one per fault
test that is stopped and restarted on the same port. No mocks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import s3fs

import eossl.streaming.storage as storage
from eossl.ingest.catalog import CATALOG_MEMBERS, Catalog
from eossl.streaming.shard_cache import TOUCH_EVERY_S
from eossl.streaming.storage import CorruptShardError, ShardReader, StorageError, StorageOptions

from conftest import complete_triplet, run_cli
from servers import TcpProxy, aws_environment, free_port, upload_tree

BUCKET = "eossl-storage"
# the cache's own mechanics (downloads, locks, eviction): every read waits for its shard's download
WAITING = StorageOptions(retries=1, backoff_s=0.01, read_while_downloading=False)


# --- a moto_server we can stop, restart on the same port, and ask which requests it received ---


class MotoProcess:
    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = workdir, port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoProcess:
        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.workdir / f"requests-{self.port}.jsonl")}
        log = open(self.workdir / f"moto-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def _api(self, action: str) -> str:
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/recorder/{action}", timeout=10) as r:
            return r.read().decode()

    def start_recording(self) -> None:
        self._api("reset-recording")
        self._api("start-recording")

    def requests(self, key_part: str = "") -> list[dict]:
        """Requests received since start_recording() whose URL contains ``key_part``."""
        rows = [json.loads(line) for line in self._api("download-recording").splitlines() if line.strip()]
        return [r for r in rows if key_part in r["url"]]


def upload_shards(root: Path, url: str) -> None:
    s3fs.S3FileSystem.clear_instance_cache()
    upload_tree(root / "shards", f"{url}/shards")


# --- the dataset: 5 complete triplets in 3 shards (2 + 2 + 1 samples), written by the real CLI ---


@dataclass
class Dataset:
    root: Path
    shards: list[dict]
    catalog: Catalog
    expected: dict[tuple[int, str], bytes]  # (row, member) -> bytes read with tarfile
    items: list[tuple[int, str, int, int, int]]  # (row, member, shard, offset, size) of every member

    def members_of(self, shard: int) -> list[tuple[int, str, int, int, int]]:
        return [it for it in self.items if it[2] == shard]


def _member_name(key: str, member: str) -> str:
    return f"{key}.json" if member == "json" else f"{key}.{member}.npy"


@pytest.fixture(scope="module")
def dataset(module_tmp) -> Dataset:
    base = module_tmp("storage")
    for patch in range(1, 6):
        complete_triplet(base / "src", scene=1, patch=patch)
    run_cli("ingest", str(base / "src"), str(base / "ds"), "--shard-size", "5MB", "--no-progress")
    shards = json.loads((base / "ds/manifest.json").read_text())["shards"]
    catalog = Catalog.from_bytes((base / "ds/catalog.npz").read_bytes())
    assert len(shards) == 3 and len(catalog) == 5
    expected, items = {}, []
    for row in range(len(catalog)):
        shard = int(catalog.shard[row])
        with tarfile.open(base / "ds" / shards[shard]["path"]) as tar:
            for m in CATALOG_MEMBERS:
                if catalog.offset[m][row] >= 0:
                    expected[row, m] = tar.extractfile(_member_name(str(catalog.key[row]), m)).read()
                    items.append((row, m, shard, int(catalog.offset[m][row]), int(catalog.size[m][row])))
    return Dataset(base / "ds", shards, catalog, expected, items)


@pytest.fixture(scope="module")
def moto(dataset, module_tmp):
    """A recording moto_server holding the dataset's shards at s3://eossl-storage/ds."""
    server = MotoProcess(module_tmp("moto-storage")).start()
    try:
        with aws_environment(server.endpoint):
            upload_shards(dataset.root, f"s3://{BUCKET}/ds")
            yield server
    finally:
        server.stop()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.tar"))


def _assert_reads_equal(reader: ShardReader, dataset: Dataset, items) -> None:
    for row, m, shard, offset, size in items:
        assert reader.read(shard, offset, size) == dataset.expected[row, m], (row, m)


# --- local folder ---


def test_local_reads_equal_tarfile_members(dataset):
    reader = ShardReader(str(dataset.root), dataset.shards)
    _assert_reads_equal(reader, dataset, dataset.items)
    row, _, shard, offset, size = next(it for it in dataset.items if it[1] == "s2")
    s2 = np.load(io.BytesIO(reader.read(shard, offset, size)))
    assert s2.shape == (256, 256, 13) and s2.dtype == np.uint16
    assert np.array_equal(s2, np.load(io.BytesIO(dataset.expected[row, "s2"])))
    assert reader.stats["bytes_read"] == sum(it[4] for it in dataset.items) + size
    assert reader.stats["requests"] == 0
    with pytest.raises(ValueError, match="outside"):
        reader.read(0, dataset.shards[0]["bytes"] - 10, 11)
    reader.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_local_member_read_does_not_read_the_shard(dataset):
    def rchar() -> int:
        return int(
            next(
                line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")
            ).split()[1]
        )

    reader = ShardReader(str(dataset.root), dataset.shards)
    _, _, shard, offset, size = next(it for it in dataset.items if it[1] == "json")
    reader.read(shard, offset, size)  # opens the file
    before = rchar()
    reader.read(shard, offset, size)
    assert rchar() - before < size + 16_384  # the member (a few kB), not the 5 MB shard


@pytest.mark.parametrize("how", ["read", "view"])
def test_local_truncated_and_missing_shards(dataset, tmp_path, how):
    copy = tmp_path / "ds"
    shutil.copytree(dataset.root / "shards", copy / "shards")
    broken = copy / dataset.shards[1]["path"]
    with open(broken, "r+b") as f:
        f.truncate(dataset.shards[1]["bytes"] // 2)
    reader = ShardReader(str(copy), dataset.shards)
    fetch = reader.read if how == "read" else reader.view
    _assert_reads_equal(reader, dataset, dataset.members_of(0))  # the intact shard still reads
    # even a range that is inside the short file: the size is checked at open (a view never maps it)
    with pytest.raises(CorruptShardError, match=rf"{broken}.*truncated"):
        fetch(1, 0, 512)
    (copy / dataset.shards[2]["path"]).unlink()
    with pytest.raises(StorageError, match="shard-000002.tar: not found"):
        fetch(2, 0, 512)
    reader.close()


def test_local_fd_lru_is_safe_under_threads(dataset, monkeypatch):
    monkeypatch.setattr(storage, "MAX_OPEN_FILES", 2)  # 3 shards, 2 fds: threads force constant eviction
    reader = ShardReader(str(dataset.root), dataset.shards)
    work = dataset.items * 10
    random.Random(0).shuffle(work)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda it: reader.read(*it[2:]) == dataset.expected[it[0], it[1]], work))
    assert all(results)
    shard_dir = str(dataset.root / "shards")
    open_shards = [
        fd
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(shard_dir)
    ]
    assert len(open_shards) <= 2
    reader.close()


def _mapped_paths() -> set[str]:
    """The files mapped into this process (``/proc/self/maps``)."""
    fields = (line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines())
    return {f[5].strip() for f in fields if len(f) == 6}


@pytest.mark.parametrize("populate", [True, False], ids=["populate", "page_faults"])
def test_local_views_are_the_members_in_place_and_outlive_the_open_files(dataset, monkeypatch, populate):
    monkeypatch.setattr(storage, "_populate", [populate])  # False: as on a kernel without MADV_POPULATE_READ
    reader = ShardReader(str(dataset.root), dataset.shards)
    views = [reader.view(shard, offset, size) for _, _, shard, offset, size in dataset.items]
    assert all(v.readonly for v in views)
    assert [bytes(v) for v in views] == [dataset.expected[it[0], it[1]] for it in dataset.items]
    assert reader.stats["bytes_read"] == sum(it[4] for it in dataset.items)
    files = {os.path.realpath(dataset.root / s["path"]) for s in dataset.shards}
    assert files <= _mapped_paths()  # mapped: the bytes were not copied out of the page cache
    assert {os.path.realpath(m.path) for m in reader.mapped_files()} == files
    with pytest.raises(ValueError, match="outside"):
        reader.view(0, dataset.shards[0]["bytes"] - 10, 11)

    reader.close()  # the files are closed; the views still show their bytes
    assert reader.mapped_files() == []
    assert [bytes(v) for v in views] == [dataset.expected[it[0], it[1]] for it in dataset.items]
    del views
    gc.collect()
    assert not files & _mapped_paths()  # unmapped with the last view

    again = ShardReader(str(dataset.root), dataset.shards)
    _, _, shard, offset, size = dataset.items[0]
    view = again.view(shard, offset, size)
    again.unmap_files()  # dropped, but the view keeps its mapping
    assert again.mapped_files() == []
    assert os.path.realpath(dataset.root / dataset.shards[shard]["path"]) in _mapped_paths()
    assert bytes(view) == dataset.expected[dataset.items[0][:2]]
    again.close()

    off = ShardReader(str(dataset.root), dataset.shards, StorageOptions(map_files=False))
    assert off.view(shard, offset, size) is None and off.stats["bytes_read"] == 0


def test_a_shard_cut_short_after_it_was_mapped_fails_the_view_and_the_process_lives_on(dataset, tmp_path):
    """Pages past a mapped file's end kill the process that reads them (SIGBUS); ``view`` maps a member's
    pages before anything reads them, so a file cut short while the reader holds it is a clear error."""
    copy = tmp_path / "ds"
    shutil.copytree(dataset.root / "shards", copy / "shards")
    row, m, shard, offset, size = max(dataset.items, key=lambda it: it[3] + it[4])  # the last member
    reader = ShardReader(str(copy), dataset.shards)
    first = min((it for it in dataset.items if it[2] == shard), key=lambda it: it[3])
    assert bytes(reader.view(*first[2:])) == dataset.expected[first[:2]]  # opened and mapped
    path = copy / dataset.shards[shard]["path"]
    os.truncate(path, offset)  # the file now ends where the last member begins
    with pytest.raises(CorruptShardError, match=rf"{path}: bytes {offset}-{offset + size} are no longer"):
        reader.view(shard, offset, size)
    with pytest.raises(CorruptShardError, match=rf"{path}: short read"):  # the same through a pread
        reader.read(shard, offset, size, out=bytearray(size))
    assert bytes(reader.view(*first[2:])) == dataset.expected[first[:2]]  # what is left still reads
    reader.close()


# --- S3 without a cache: one ranged GET per read ---


def test_s3_ranged_reads_one_get_each(dataset, moto):
    reader = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, StorageOptions(retries=1, backoff_s=0.01))
    moto.start_recording()
    _assert_reads_equal(reader, dataset, dataset.items)
    received = moto.requests("/shards/")
    assert reader.stats["requests"] == len(dataset.items) == len(received)
    assert all(r["method"] == "GET" and "bytes=" in r["headers"].get("Range", "") for r in received)
    assert reader.stats["retries"] == 0 and reader.stats["downloads"] == 0


def test_loader_reads_a_sample_with_one_get_when_its_members_lie_together(dataset, moto):
    """S1 + S2 of a sample are adjacent in the shard: the loader fetches both with one ranged GET."""
    from eossl.streaming.inputs import InputSpec
    from eossl.streaming.loader import LoaderConfig, SSLLoader
    from eossl.streaming.plan import PlanConfig
    from eossl.streaming.views import ViewConfig

    upload_tree(dataset.root, f"s3://{BUCKET}/whole")
    cfg = LoaderConfig(
        batch_size=1,
        split="all",
        device="cpu",
        workers=0,
        num_threads=1,
        plan=PlanConfig(seed=1),
        views=ViewConfig(mode="single", inputs=InputSpec(sensors=("s1", "s2")), size=32),
    )
    remote, local = SSLLoader(f"s3://{BUCKET}/whole", cfg), SSLLoader(str(dataset.root), cfg)
    moto.start_recording()
    got = list(remote)
    received = moto.requests("/whole/shards/")
    assert len(got) == len(dataset.catalog) == 5
    spans = {}
    for row in range(len(dataset.catalog)):
        ends = [
            (
                int(dataset.catalog.offset[m][row]),
                int(dataset.catalog.offset[m][row] + dataset.catalog.size[m][row]),
            )
            for m in ("s1", "s2")
        ]
        spans[row] = (min(a for a, _ in ends), max(b for _, b in ends))
    ranges = []
    for r in received:
        assert r["method"] == "GET" and r["headers"]["Range"].startswith("bytes="), r
        first, last = r["headers"]["Range"].removeprefix("bytes=").split("-")
        ranges.append((int(first), int(last) + 1))
    # Every GET is one sample's S1..S2 span, never a single member; DALI may already have prefetched the
    # first samples of the next epoch, so a span can appear more than once.
    assert set(ranges) == set(spans.values()) and len(ranges) <= len(spans) + cfg.prefetch
    for a, b in zip(got, list(local), strict=True):  # the same bytes as the local pread path
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.views[0].numpy(), b.views[0].numpy())


def test_s3_missing_object_fails_at_once(dataset, moto):
    shards = [{**dataset.shards[0], "path": "shards/shard-999999.tar"}]
    slept: list[float] = []
    reader = ShardReader(
        f"s3://{BUCKET}/ds", shards, StorageOptions(retries=3, backoff_s=2.0), sleep=slept.append
    )
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/ds/shards/shard-999999.tar: not found"):
        reader.read(0, 0, 100)
    assert slept == [] and reader.stats["retries"] == 0  # a 404 is not retried: no back-off at all


def test_s3_truncated_object_without_cache(dataset, moto):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/short/shards/shard-000000.tar", b"x" * 1000)
    reader = ShardReader(f"s3://{BUCKET}/short", dataset.shards[:1], StorageOptions(retries=0))
    with pytest.raises(CorruptShardError, match=rf"s3://{BUCKET}/short/shards/shard-000000.tar: short read"):
        reader.read(0, 512, 4096)


# --- S3 with the node-local cache ---


def test_s3_cache_downloads_once_then_hits(dataset, moto, tmp_path):
    options = replace(WAITING, cache_dir=str(tmp_path / "cache"))
    reader = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, options)
    moto.start_recording()
    items = dataset.members_of(0)
    _assert_reads_equal(reader, dataset, items)
    assert reader.stats["downloads"] == 1 and reader.stats["requests"] == 1
    assert reader.stats["cache_misses"] == 1 and reader.stats["cache_hits"] == len(items) - 1
    assert len(moto.requests("/shards/shard-000000.tar")) == 1
    (cached,) = (tmp_path / "cache").rglob("*.tar")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == dataset.shards[0]["sha256"]
    again = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, options)  # another reader on the node reuses it
    _assert_reads_equal(again, dataset, items)
    assert again.stats["downloads"] == 0 and again.stats["cache_hits"] == len(items)
    assert len(moto.requests("/shards/")) == 1


def test_s3_views_are_of_the_node_copies_only(dataset, moto, tmp_path):
    """Without a cache, or for a shard still downloading with ``read_while_downloading``, there is no file
    to map: ``view`` is None and asks nothing of the server; with a cache it waits for the download and
    maps the copy."""
    no_cache = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, replace(WAITING, cache_dir=None))
    _, _, shard, offset, size = dataset.items[0]
    assert no_cache.view(shard, offset, size) is None and no_cache.stats["requests"] == 0
    racing_cache = StorageOptions(cache_dir=str(tmp_path / "racing"), read_while_downloading=True)
    racing = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, racing_cache)
    assert racing.view(shard, offset, size) is None and racing.stats["requests"] == 0

    cache = tmp_path / "cache"
    reader = ShardReader(f"s3://{BUCKET}/ds", dataset.shards, replace(WAITING, cache_dir=str(cache)))
    views = [(it, reader.view(*it[2:])) for it in dataset.items]
    assert all(bytes(v) == dataset.expected[it[0], it[1]] for it, v in views)
    assert reader.stats["downloads"] == len(dataset.shards)
    assert reader.stats["cache_misses"] == len(dataset.shards)
    assert reader.stats["cache_hits"] == len(dataset.items) - len(dataset.shards)
    copies = {os.path.realpath(p) for p in cache.rglob("*.tar")}
    assert {os.path.realpath(m.path) for m in reader.mapped_files()} == copies and copies <= _mapped_paths()
    reader.close()


def test_s3_cache_rejects_a_tampered_shard(dataset, moto, tmp_path):
    data = bytearray((dataset.root / dataset.shards[0]["path"]).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/tampered/shards/shard-000000.tar", bytes(data))
    cache = tmp_path / "cache"
    reader = ShardReader(
        f"s3://{BUCKET}/tampered",
        dataset.shards[:1],
        replace(WAITING, cache_dir=str(cache)),
    )
    with pytest.raises(CorruptShardError, match=rf"s3://{BUCKET}/tampered/shards/shard-000000.tar: checksum"):
        reader.read(0, 0, 512)
    assert [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def _read_in_spawned_process(reader: ShardReader, items, barrier, queue) -> None:
    barrier.wait(timeout=60)  # both processes ask for the shard at the same moment
    data = b"".join(reader.read(shard, offset, size) for _, _, shard, offset, size in items)
    queue.put((reader.stats["downloads"], hashlib.sha256(data).hexdigest()))


@pytest.mark.slow
def test_s3_cache_shared_by_processes_downloads_once(dataset, moto, tmp_path):
    reader = ShardReader(
        f"s3://{BUCKET}/ds",
        dataset.shards,
        replace(WAITING, cache_dir=str(tmp_path / "cache")),
    )
    items = dataset.members_of(1)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    moto.start_recording()
    procs = [
        ctx.Process(target=_read_in_spawned_process, args=(reader, items, barrier, queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    want = hashlib.sha256(b"".join(dataset.expected[row, m] for row, m, *_ in items)).hexdigest()
    assert sorted(d for d, _ in results) == [0, 1] and {h for _, h in results} == {want}
    assert len(moto.requests("/shards/")) == 1
    assert len(list((tmp_path / "cache").rglob("*.tar"))) == 1


def test_s3_cache_threads_download_each_shard_once(dataset, moto, tmp_path):
    reader = ShardReader(
        f"s3://{BUCKET}/ds",
        dataset.shards,
        replace(WAITING, cache_dir=str(tmp_path / "cache")),
    )
    work = dataset.items * 4
    random.Random(1).shuffle(work)
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda it: reader.read(*it[2:]) == dataset.expected[it[0], it[1]], work))
    assert reader.stats["downloads"] == reader.stats["cache_misses"] == 3
    assert reader.stats["cache_hits"] == len(work) - 3


def test_s3_cache_bounded_evicts_least_recently_used(dataset, moto, tmp_path):
    big, small = dataset.shards[0]["bytes"], dataset.shards[2]["bytes"]  # 5 MB, 2.5 MB
    url = f"s3://{BUCKET}/ds"
    bound = int(1.4 * big)  # room for one big shard, or one big and not quite one small
    cache = tmp_path / "bounded"
    reader = ShardReader(url, dataset.shards, replace(WAITING, cache_dir=str(cache), cache_bytes=bound))
    for step, shard in enumerate([0, 1, 2, 0]):
        _assert_reads_equal(reader, dataset, dataset.members_of(shard))
        assert _folder_bytes(cache) <= bound, step
    assert reader.stats["downloads"] == 4 and reader.stats["evictions"] == 3

    # LRU by use, not by download: shard 0 read again after shard 2 was downloaded is kept.
    cache = tmp_path / "lru"
    now = [0.0]  # the touch interval's clock, advanced by hand
    reader = ShardReader(
        url,
        dataset.shards,
        replace(WAITING, cache_dir=str(cache), cache_bytes=2 * big + small // 2),
        clock=lambda: now[0],
    )
    _assert_reads_equal(reader, dataset, dataset.members_of(0))
    _assert_reads_equal(reader, dataset, dataset.members_of(2))
    t = time.time()  # the download order, whatever the file system's timestamp granularity
    for shard, age in ((0, 200), (2, 100)):
        (path,) = cache.rglob(f"shard-{shard:06d}.*.tar")
        os.utime(path, (t - age, t - age))
    now[0] += TOUCH_EVERY_S
    _assert_reads_equal(reader, dataset, dataset.members_of(0))  # touches shard 0
    _assert_reads_equal(reader, dataset, dataset.members_of(1))  # over the bound: evicts one shard
    kept = sorted(p.name.split(".")[0] for p in cache.rglob("*.tar"))
    assert kept == ["shard-000000", "shard-000001"] and reader.stats["evictions"] == 1


class WholeObjectGate(TcpProxy):
    """``TcpProxy`` that holds every GET without a ``Range`` header (a whole-shard download) until
    ``release`` is set; ranged GETs pass."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.release = threading.Event()
        self.held = threading.Event()

    def _pumps(self, client, upstream):
        (_, src, dst), answer = super()._pumps(client, upstream)
        return [(self._gate, src, dst), answer]

    def _gate(self, src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                head = data.lower()
                if head.startswith(b"get ") and b"\r\nrange:" not in head:
                    self.held.set()
                    if not self.release.wait(timeout=120):
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_s3_cache_reads_a_shard_while_it_downloads(dataset, moto, tmp_path):
    """A shard not on the node yet is read by ranged GETs while its download runs; then from the copy."""
    gate = WholeObjectGate(moto.port)
    gate.start()
    cache = tmp_path / "cache"
    try:
        with aws_environment(gate.endpoint):
            reader = ShardReader(
                f"s3://{BUCKET}/ds",
                dataset.shards,
                StorageOptions(cache_dir=str(cache), read_while_downloading=True),
            )
            items = dataset.members_of(0)
            _assert_reads_equal(reader, dataset, items)  # the download is held: every read was ranged
            assert gate.held.wait(timeout=30)
            assert reader.stats["reads_while_downloading"] == len(items) == reader.stats["requests"] - 1
            assert reader.stats["downloads"] == 0 and not list(cache.rglob("*.tar"))
            gate.release.set()
            deadline = time.monotonic() + 60
            while reader.stats["downloads"] == 0 and time.monotonic() < deadline:  # downloaded, checked
                time.sleep(0.05)
            (copy,) = cache.rglob("*.tar")
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == dataset.shards[0]["sha256"]
            requests = reader.stats["requests"]
            _assert_reads_equal(reader, dataset, items)  # from the node's copy now
            assert reader.stats["requests"] == requests and reader.stats["cache_hits"] == len(items)
            reader.close()
    finally:
        gate.release.set()
        gate.stop()


def test_s3_a_failed_background_download_makes_the_next_read_wait_and_name_the_fault(dataset, moto, tmp_path):
    """A cache that cannot take the shard (here its folder is a file): the first read is served by a ranged
    GET, and once the background download has failed, a read of the shard raises the cache's error."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    reader = ShardReader(
        f"s3://{BUCKET}/ds",
        dataset.shards,
        StorageOptions(cache_dir=str(blocker / "cache"), retries=0, read_while_downloading=True),
    )
    (row, m, shard, offset, size), *_ = dataset.members_of(0)
    assert reader.read(shard, offset, size) == dataset.expected[row, m]
    deadline = time.monotonic() + 60
    with pytest.raises(
        StorageError, match="not-a-folder/cache/.*: cannot create the cache folder: Not a dir"
    ):
        while time.monotonic() < deadline:  # ranged reads until the download has failed, then the error
            reader.read(shard, offset, size)
            time.sleep(0.05)
    assert reader.stats["reads_while_downloading"] >= 1 and reader.stats["downloads"] == 0


def test_s3_prefetch_then_pickle_reads_from_cache(dataset, moto, tmp_path):
    cache = tmp_path / "cache"
    reader = ShardReader(
        f"s3://{BUCKET}/ds", dataset.shards, StorageOptions(cache_dir=str(cache), read_while_downloading=True)
    )
    reader.prefetch([0, 1, 2])
    deadline = time.monotonic() + 30
    while len(list(cache.rglob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_reads_equal(reader, dataset, dataset.items)
    assert reader.stats["downloads"] == 3 and reader.stats["cache_misses"] == 0
    clone = pickle.loads(pickle.dumps(reader))  # open fds, client and prefetch threads are not pickled
    _assert_reads_equal(clone, dataset, dataset.items)
    assert clone.stats["downloads"] == 0 and clone.stats["cache_hits"] == len(dataset.items)
    reader.close()
    clone.close()


def test_pickled_readers_still_read(dataset, moto):
    for reader in (
        ShardReader(str(dataset.root), dataset.shards),
        ShardReader(f"s3://{BUCKET}/ds", dataset.shards),
    ):
        _assert_reads_equal(reader, dataset, dataset.items[:3])
        clone = pickle.loads(pickle.dumps(reader))
        _assert_reads_equal(clone, dataset, dataset.items)
        assert clone.dataset == reader.dataset and clone.stats["bytes_read"] == sum(
            it[4] for it in dataset.items
        )


# --- faults: the server goes away, comes back, or never answers ---


@pytest.mark.slow
def test_s3_server_down_fails_after_its_retries_then_recovers_on_restart(dataset, tmp_path):
    server = MotoProcess(tmp_path).start()
    proxy = TcpProxy(server.port)  # the readers' endpoint: lets the restarted server fill up unseen
    proxy.start()
    url = f"s3://{BUCKET}/faults"
    try:
        with aws_environment(proxy.endpoint):
            upload_shards(dataset.root, url)
            (_, _, shard, offset, size), want = dataset.items[-1], dataset.expected[dataset.items[-1][:2]]
            reader = ShardReader(url, dataset.shards, StorageOptions(retries=2, backoff_s=0.05, timeout_s=2))
            assert reader.read(shard, offset, size) == want
            server.stop()  # the server process dies: connections through the proxy are refused

            with pytest.raises(StorageError, match=rf"{url}/shards/shard-000002.tar: .*after 3 attempts"):
                reader.read(shard, offset, size)
            assert reader.stats["retries"] == 2

            # A read waits in its back-off while the server restarts (same port, data uploaded again: moto
            # keeps it in memory). The proxy stays cut until the data is back, so no attempt sees a server
            # without it (a missing object is, rightly, not retried), however long the restart takes.
            patient = ShardReader(url, dataset.shards, StorageOptions(retries=8, backoff_s=0.5, timeout_s=2))
            proxy.stop()

            def restart() -> None:
                while patient.stats["retries"] < 2:
                    time.sleep(0.01)
                server.start()
                fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=server.endpoint)
                fs.mkdir(BUCKET)
                fs.put_file(
                    str(dataset.root / dataset.shards[shard]["path"]),
                    f"{url}/{dataset.shards[shard]['path']}",
                )
                proxy.start()

            restarter = threading.Thread(target=restart)
            restarter.start()
            assert patient.read(shard, offset, size) == want
            restarter.join()
            assert patient.stats["retries"] >= 2
    finally:
        proxy.stop()
        server.stop()


@pytest.mark.slow
def test_s3_unresponsive_server_times_out(dataset):
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        with aws_environment(f"http://127.0.0.1:{silent.getsockname()[1]}"):
            reader = ShardReader(
                f"s3://{BUCKET}/ds", dataset.shards, StorageOptions(retries=1, backoff_s=0.05, timeout_s=0.5)
            )
            with pytest.raises(
                StorageError, match=rf"s3://{BUCKET}/ds/shards/shard-000000.tar: .*after 2 attempts"
            ):
                reader.read(0, 0, 100)
            # Each attempt ended on our timeout, not the client's default (15 s read, 60 s connect), and
            # botocore's own retries are off: the attempts counted are the only ones made.
            client = reader._filesystem().s3.meta.config
            assert (client.connect_timeout, client.read_timeout) == (0.5, 0.5)
            assert client.retries["total_max_attempts"] == 1 and reader.stats["retries"] == 1
