"""The shared-memory reader processes: the same batches as the sample source, read into shared memory in
place; a reader that fails, stops or dies is reported instead of waited on; nothing outlives its owner."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

import eossl.streaming.storage as storage
from eossl.streaming.inputs import InputSpec
from eossl.streaming.loader import LoaderConfig, SSLLoader, StreamingError
from eossl.streaming.plan import PlanConfig
from eossl.streaming.shared_readers import (
    ReaderFailed,
    ReaderGone,
    SharedMemoryReaders,
    SlotLayout,
    _MappedFiles,
)
from eossl.streaming.storage import StorageOptions
from eossl.streaming.views import ViewConfig

from conftest import complete_triplet, run_cli, sen12ms_path, spoil_s1
from servers import upload_tree

PAIR = ViewConfig(mode="pair", inputs=InputSpec(sensors=("s1", "s2")), size=32)


def _cfg(**kw) -> LoaderConfig:
    base = LoaderConfig(
        batch_size=2, split="all", device="cpu", workers=2, num_threads=1, views=PAIR, plan=PlanConfig(seed=5)
    )
    return replace(base, **kw)


def _info(epoch_idx: int, iteration: int) -> SimpleNamespace:
    return SimpleNamespace(epoch_idx=epoch_idx, iteration=iteration)


def _base(arr: np.ndarray):
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


def _in_mapping(arr: np.ndarray) -> bool:
    return isinstance(_base(arr), mmap.mmap)


def _mapped_paths() -> set[str]:
    """The files mapped into this process (``/proc/self/maps``)."""
    fields = (line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines())
    return {f[5].strip() for f in fields if len(f) == 6}


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def nan_dataset(module_tmp) -> Path:
    """Four triplets; one S1 patch with NaN and +-Inf pixels (kept by ingest, filled by the loader)."""
    root = module_tmp("nan")
    src, out = root / "src", root / "ds"
    for scene, patch in ((1, 1), (1, 2), (2, 1), (2, 2)):
        complete_triplet(src, scene=scene, patch=patch)
    spoil_s1(sen12ms_path(src, "s1", scene=1, patch=2))
    run_cli("ingest", str(src), str(out), "--max-s1-invalid", "0.5", "--no-progress", "--shard-size", "8MB")
    return out


def test_batches_equal_the_sample_source_read_in_place_with_nonfinite_s1_filled(nan_dataset):
    loader = SSLLoader(str(nan_dataset), _cfg())
    source = loader.sample_source()
    readers = loader.batch_source()
    assert isinstance(readers, SharedMemoryReaders)
    try:
        filled = 0
        for epoch_idx in range(2):
            for it in range(len(loader)):
                want, got = source(_info(epoch_idx, it)), readers(_info(epoch_idx, it))
                assert len(want) == len(got)
                for w, g in zip(want, got, strict=True):
                    if isinstance(w, list):
                        assert all(_in_mapping(a) for a in g)  # handed over without a copy
                        for a, b in zip(w, g, strict=True):
                            assert a.dtype == b.dtype and np.array_equal(a, b)
                    else:
                        np.testing.assert_array_equal(w, g)
                s1 = got[0]
                for row, arr in zip(got[len(loader.views.sensors)][:, 0], s1, strict=True):
                    assert np.isfinite(arr).all()
                    if str(loader.catalog.key[row]).endswith("_1_p2"):
                        filled += 1
                        assert np.array_equal(arr[10:12, 20:25, 0], np.full((2, 5), source.s1_fill[0]))
                        assert arr[100, 100, 1] == arr[101, 100, 1] == source.s1_fill[1]
            with pytest.raises(StopIteration):
                readers(_info(epoch_idx, len(loader)))
        assert filled == 2  # the patch, once per epoch
    finally:
        readers.close()
    assert _gone(readers.pids(), 10)


@pytest.mark.parametrize("map_files", [True, False])
def test_members_come_from_the_mapped_files_or_the_slots_the_same_bytes(nan_dataset, map_files):
    """Mapped (default): every member is handed over where it lies in the shard file, no copy, except a
    filled S1 (copied into its slot first); ``map_files=False``: every member read into its slot. Both
    equal the same batches read with ``pread``; the mappings do not pile up over epochs."""
    loader = SSLLoader(str(nan_dataset), _cfg(storage=StorageOptions(map_files=map_files)))
    pread = SSLLoader(str(nan_dataset), _cfg(storage=StorageOptions(map_files=False))).sample_source()
    shard_files = {os.path.realpath(nan_dataset / s["path"]) for s in loader.manifest["shards"]}
    readers = loader.batch_source()
    try:
        from_files = filled = 0
        epochs = 2 + readers.slots // len(loader)  # past the hand-overs a batch's mappings are held
        for epoch_idx in range(epochs):
            for it in range(len(loader)):
                want, got = pread(_info(epoch_idx, it)), readers(_info(epoch_idx, it))
                rows = got[len(loader.views.sensors)][:, 0]
                for k, sensor in enumerate(loader.views.sensors):
                    for row, a, b in zip(rows, want[k], got[k], strict=True):
                        assert a.dtype == b.dtype and np.array_equal(a, b)
                        in_slot = _base(b) is readers._mapping
                        was_filled = sensor == "s1" and str(loader.catalog.key[row]).endswith("_1_p2")
                        filled += was_filled
                        from_files += not in_slot
                        assert in_slot == (was_filled or not map_files), (sensor, row)
                        assert b.flags.writeable == in_slot
            # each batch maps its files afresh; those of batches DALI has let go of are dropped
            handovers = (epoch_idx + 1) * len(loader)
            assert len(readers._files) <= len(shard_files) * min(handovers, readers.slots) * map_files
        assert filled == epochs and from_files == ((2 * 4 - 1) * epochs if map_files else 0)  # 4 samples
        if map_files:
            assert shard_files <= _mapped_paths()
    finally:
        readers.close()


def test_a_node_cache_evicting_the_copies_of_batches_in_flight_changes_no_batch(
    dataset, s3_endpoint, tmp_path
):
    """A node cache that holds two of the dataset's eight shards: copies the readers have mapped and handed
    over are evicted (unlinked), and evicted ones downloaded again, while their batches are in flight. The
    pipeline still maps the very files the readers checked, and every batch equals the local dataset's."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    upload_tree(dataset, "s3://readers-cache/ds")
    shards = SSLLoader(str(dataset), _cfg()).manifest["shards"]
    assert len(shards) == 8
    cache = tmp_path / "cache"
    storage = StorageOptions(
        cache_dir=str(cache), cache_bytes=2 * max(s["bytes"] for s in shards), retries=1, backoff_s=0.01
    )
    local = SSLLoader(str(dataset), _cfg(storage=StorageOptions(map_files=False))).sample_source()
    loader = SSLLoader("s3://readers-cache/ds", _cfg(storage=storage))
    readers = loader.batch_source()
    try:
        from_files = 0
        for epoch_idx in range(2):
            for it in range(len(loader)):
                want, got = local(_info(epoch_idx, it)), readers(_info(epoch_idx, it))
                for w, g in zip(want, got, strict=True):
                    if not isinstance(w, list):
                        np.testing.assert_array_equal(w, g)
                        continue
                    for a, b in zip(w, g, strict=True):
                        assert np.array_equal(a, b)
                        from_files += _base(b) is not readers._mapping
        assert from_files == 2 * 2 * 24  # every member of both epochs, from a mapped copy
        assert len(list(cache.rglob("*.tar"))) <= 3  # the bound, and one download's room
    finally:
        readers.close()


def _loader_script(path: Path, dataset: Path, imports: str, body: str) -> Path:
    """A script at ``path`` that builds the module's pair loader (2 reader workers) on ``dataset`` as
    ``loader`` and then runs ``body``: a process of its own to limit or kill."""
    head = f"""
        from eossl.streaming.inputs import InputSpec
        from eossl.streaming.loader import LoaderConfig, SSLLoader
        from eossl.streaming.views import ViewConfig

        if __name__ == "__main__":
            views = ViewConfig(mode="pair", inputs=InputSpec(sensors=("s1", "s2")), size=32)
            cfg = LoaderConfig(batch_size=2, split="all", device="cpu", workers=2, views=views)
            loader = SSLLoader({str(dataset)!r}, cfg)
        """
    path.write_text(imports + textwrap.dedent(head) + textwrap.indent(textwrap.dedent(body), "    "))
    return path


def test_the_loaders_processes_lift_a_low_soft_limit_on_open_files(dataset, tmp_path):
    """Mappings hold descriptors for the last batches' files: a soft limit of 256 under a higher hard one is
    lifted in the pipeline's process and in every reader."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files is {hard}")
    script = _loader_script(
        tmp_path / "limits.py",
        dataset,
        "import resource\nfrom pathlib import Path\nfrom types import SimpleNamespace",
        """
        before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        readers = loader.batch_source()
        readers(SimpleNamespace(epoch_idx=0, iteration=0))  # every reader has started
        limits = [Path(f"/proc/{p}/limits").read_text() for p in readers.pids()]
        soft = [int(next(l for l in t.splitlines() if "open files" in l).split()[3]) for t in limits]
        print(before, resource.getrlimit(resource.RLIMIT_NOFILE)[0], *soft)
        readers.close()
        """,
    )

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, preexec_fn=low_soft_limit
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, main, *readers = (int(v) for v in done.stdout.split())
    want = hard if hard != resource.RLIM_INFINITY else main
    assert before == 256 and main == want and readers == [want, want]


def _file(path: Path, data: bytes) -> tuple:
    """``data`` written to ``path`` and opened as a reader would: (path, device, inode, pid, fd)."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    return (str(path), st.st_dev, st.st_ino, os.getpid(), fd)


@pytest.mark.parametrize("populate", [True, False], ids=["populate", "page_faults"])
def test_the_pipeline_maps_the_very_file_a_reader_checked(tmp_path, monkeypatch, populate):
    """A node-cache copy replaced under its path (evicted, downloaded again) after a reader checked it:
    the pipeline maps the file the reader checked, through the reader's descriptor; once that is closed
    too, a clear error, never the other file's bytes. (``populate`` False: pages mapped by touching them,
    as on a kernel without ``MADV_POPULATE_READ``.)"""
    monkeypatch.setattr(storage, "_populate", [populate])
    path = tmp_path / "shard.tar"
    where = _file(path, bytes(range(256)) * 64)  # this process stands in for the reader
    files = _MappedFiles(hold=2)
    files.begin()
    assert files.array(where, 256 + 4, (4,), "|u1").tolist() == [4, 5, 6, 7]  # by its path
    (tmp_path / "new").write_bytes(b"\xff" * 16384)
    os.replace(tmp_path / "new", path)
    files.begin()
    assert files.array(where, 8, (2,), "<u2").tolist() == [0x0908, 0x0B0A]  # by the reader's descriptor
    os.close(where[4])
    files.begin()
    with pytest.raises(
        ReaderFailed, match=rf"{path}: the shard file a reader checked can no longer be opened"
    ):
        files.array(where, 0, (1,), "|u1")


def test_a_file_cut_short_after_a_reader_checked_it_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "shard.tar"
    where = _file(path, b"s" * 16384)
    files = _MappedFiles(hold=2)
    files.begin()
    assert bytes(files.array(where, 0, (4,), "|u1")) == b"ssss"
    os.truncate(path, 4096)  # the pages of bytes 8192-8196 would kill this process if it read them
    with pytest.raises(ReaderFailed, match=rf"{path}: bytes 8192-8196 are no longer in the file"):
        files.array(where, 8192, (4,), "|u1")
    os.close(where[4])


def test_a_batchs_mappings_are_dropped_when_its_slot_would_be_written_again(tmp_path):
    first, second = _file(tmp_path / "a.tar", b"a" * 8192), _file(tmp_path / "b.tar", b"b" * 8192)
    files = _MappedFiles(hold=3)
    files.begin()
    arrays = [files.array(first, 0, (4,), "|u1"), files.array(first, 4, (4,), "|u1")]  # one mapping
    files.begin()
    arrays.append(files.array(second, 0, (4,), "|u1"))
    files.begin()
    assert len(files) == 2
    files.begin()  # three hand-overs after the first batch: DALI no longer reads it
    assert len(files) == 1
    assert str(tmp_path / "a.tar") in _mapped_paths()  # still mapped while an array points into it
    assert [bytes(a) for a in arrays] == [b"aaaa", b"aaaa", b"bbbb"]
    del arrays
    gc.collect()
    assert str(tmp_path / "a.tar") not in _mapped_paths()
    for where in (first, second):
        os.close(where[4])


def test_every_member_of_the_catalog_fits_its_slot(dataset):
    loader = SSLLoader(str(dataset), _cfg())
    source = loader.sample_source()
    layout = SlotLayout.for_source(source)
    cat = loader.catalog
    for row in range(len(cat.key)):
        start = min(int(cat.offset[s][row]) for s in ("s1", "s2"))
        end = max(int(cat.offset[s][row] + cat.size[s][row]) for s in ("s1", "s2"))
        assert layout.place(("span", 1), end - start) == layout.stride
        for s in ("s1", "s2"):
            layout.place(("raw", s, 0), int(cat.size[s][row]))
    with pytest.raises(RuntimeError, match="does not fit its slot"):
        layout.place(("span", 0), layout.stride + 1)
    with pytest.raises(RuntimeError, match="does not fit its slot"):
        layout.place(("span", layout.samples), 1)


def test_a_failing_read_comes_back_with_its_message(copy_of_dataset):
    """A member whose bytes changed after ingest, with on_corrupt='fail': the reader's error, named."""
    loader = SSLLoader(str(copy_of_dataset), _cfg(on_corrupt="fail"))
    row = int(loader.plan(0).order[0])
    shard = copy_of_dataset / loader.manifest["shards"][int(loader.catalog.shard[row])]["path"]
    at = int(loader.catalog.offset["s2"][row]) + 4096
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    readers = loader.batch_source()
    try:
        with pytest.raises(ReaderFailed, match=r"CorruptShardError: .*fails its checksum"):
            readers(_info(0, 0))
    finally:
        readers.close()
    with pytest.raises(StreamingError, match=r"step 0: CorruptShardError: .*s2 member of sample .*checksum"):
        next(iter(SSLLoader(str(copy_of_dataset), _cfg(on_corrupt="fail"))))


def test_a_stuck_reader_times_out_and_a_killed_one_is_named(dataset):
    loader = SSLLoader(str(dataset), _cfg(reader_timeout_s=2.0))
    readers = loader.batch_source()
    try:
        for pid in readers.pids():
            os.kill(pid, signal.SIGSTOP)
        with pytest.raises(TimeoutError, match=r"no batch from the reader processes in 2 s"):
            readers(_info(0, 0))
        for pid in readers.pids():
            os.kill(pid, signal.SIGCONT)
        readers(_info(0, 0))
        victim = readers.pids()[1]
        # as in a process that ignores SIGCHLD (the dead reader is reaped at once, no zombie to wait for)
        previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            os.kill(victim, signal.SIGKILL)
            assert _gone([victim], 10)
        finally:
            signal.signal(signal.SIGCHLD, previous)
        # The next batch names it, whether or not it held a batch when it died (the other reader could
        # read every batch left).
        with pytest.raises(ReaderGone, match=rf"reader worker process\(es\) {victim} died"):
            readers(_info(0, 1))
    finally:
        readers.close()
    assert _gone(readers.pids(), 10)


def test_readers_stop_with_the_loader_and_when_their_parent_is_killed(dataset, tmp_path):
    loader = SSLLoader(str(dataset), _cfg())
    batches = iter(loader)
    next(batches)
    pids = loader._worker_pids()
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    batches.close()  # the consumer stops mid-epoch
    assert _gone(pids, 10)

    script = _loader_script(
        tmp_path / "owner.py",
        dataset,
        "import time",
        """
        batches = iter(loader)
        next(batches)
        print(" ".join(map(str, loader._worker_pids())), flush=True)
        time.sleep(600)
        """,
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = owner.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        owner.kill()  # no clean-up runs: the readers notice their parent is gone
        owner.wait(timeout=60)
        assert _gone(pids, 30), [p for p in pids if psutil.pid_exists(p)]
    finally:
        if owner.poll() is None:
            owner.kill()
