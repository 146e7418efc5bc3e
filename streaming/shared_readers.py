"""Reader processes that read each batch straight into shared memory, which the DALI pipeline reads in place.

DALI's parallel external source moves a batch twice: its worker returns the batch as Python arrays and
copies them into DALI's shared memory, then the pipeline's process takes them from there. That transport
alone cost 1.35x a raw ``pread`` of the same bytes, more than the reading it carries. Here the transport
costs no copy of sample bytes at all:

- one shared mapping (``memfd_create``: anonymous shared memory, not bound by the size of a ``/dev/shm``
  mount, gone with the last process that maps it) holds ``slots`` batches. A reader process runs the
  rank's ``SampleSource`` with its read buffers placed in the batch's slot (``SlotLayout``), so every
  sample's members are ``pread`` (or downloaded) to where the pipeline will read them;
- a member of a shard file on this node (a local dataset, a node-cache copy) is not copied at all: the
  reader checks its bytes where they lie in the page cache (``ShardReader.view``: the file mapped
  read-only) and the pipeline's process maps the same file and reads them there (``_MappedFiles``);
- the pipeline's callback (a plain external source with ``no_copy``) wraps those bytes as arrays. Only
  what is small travels through a queue: the ids, the view parameters, where each array lies;
- a slot is written again ``slots`` batches later: DALI holds a no-copy input until ``prefetch``
  iterations after it was fed, and at most ``ahead`` batches are being read at once, so
  ``slots = ahead + prefetch + 2`` never overwrites what DALI still reads; by the same rule the files a
  batch maps are unmapped ``slots`` batches later.

Every wait is bounded. The callback waits for a batch at most ``timeout_s`` and checks twice a second
that every reader process is alive: a dead one is named by pid (``ReaderGone``), a reader's exception
comes back with its message (``ReaderFailed``). Reader processes exit when their parent is gone (they
poll it while idle) and when ``close`` sends them a stop.

What a batch holds is the ``SampleSource``'s (a pure function of seed, epoch, step and rank), whichever
reader reads it.
"""

from __future__ import annotations

import bisect
import mmap
import multiprocessing
import os
import queue
import resource
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing import reduction
from types import SimpleNamespace

import numpy as np

from .source import SampleSource
from .storage import MappedFile, PagesGone, map_pages
from .worker_watch import WorkerGone, dead_processes

__all__ = ["ReaderFailed", "ReaderGone", "SharedMemoryReaders", "SlotLayout"]

ALIGN = 64  # bytes: every array starts on a cache line
POLL_S = 0.5  # how often a wait checks the reader processes (and a reader its parent)
# Every page mapped at the start: a page first touched mid-run costs a fault in each process, which made
# the first passes over the slots ~40 % dearer per sample than the later ones.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class ReaderGone(WorkerGone):
    """A reader process died (killed, out of memory) while the pipeline waited for its batch."""


class ReaderFailed(RuntimeError):
    """A reader process raised while reading a batch; the message is its exception's."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SlotLayout:
    """Where a batch's read buffers lie in its slot: sample slot ``k`` (``k >= batch_size``: the temporal
    mode's partners) owns ``stride`` bytes; its members read together (``span``) start at 0, members read
    one by one (``raw``) at ``raw_offset[sensor]``. Sized from the catalog, so no member can overflow it.
    """

    stride: int
    raw_offset: dict[str, int]
    samples: int

    @property
    def nbytes(self) -> int:
        return self.stride * self.samples

    @classmethod
    def for_source(cls, source: SampleSource) -> SlotLayout:
        sensors = source.views.sensors
        starts = np.min([source.offset[s] for s in sensors], axis=0)
        ends = np.max([source.offset[s] + source.size[s] for s in sensors], axis=0)
        span = int((ends - starts).max()) if len(starts) else 0
        raw_offset, at = {}, 0
        for s in sensors:
            raw_offset[s] = at
            at += _aligned(int(source.size[s].max()) if len(source.size[s]) else 0)
        return cls(_aligned(max(span, at, 1)), raw_offset, source.batch_size * source.views.sources)

    def place(self, key: tuple, nbytes: int) -> int:
        """Byte offset in the slot of ``SampleSource``'s buffer ``key``: ('span', k) or ('raw', sensor, k)."""
        if key[0] == "span":
            at, room = 0, self.stride
        else:
            at = self.raw_offset[key[1]]
            room = self.stride - at
        if key[-1] >= self.samples or nbytes > room:
            raise RuntimeError(f"read buffer {key} of {nbytes} bytes does not fit its slot ({room} bytes)")
        return key[-1] * self.stride + at


def lift_open_file_limit() -> tuple[int, int]:
    """Lift this process's soft limit on open files to its hard limit; the (soft, hard) limits after.

    A mapping holds a descriptor (Python's ``mmap`` keeps its own) and a reader holds one per file it hands
    over, for the files of the last ``slots`` batches: with the default 256 MB shards ~150 per process, but
    small shards and large batches could pass a soft limit of 1,024, which many systems set below a hard
    limit of tens of thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (
            ValueError,
            OSError,
        ):  # an unlimited hard limit above what the kernel takes: keep the soft one
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class _SharedFd:
    """A file descriptor that travels to a spawned process as a descriptor (multiprocessing's ``DupFd``),
    not as a number."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _attach_fd, (reduction.DupFd(self.fd),)


def _attach_fd(dup) -> _SharedFd:
    return _SharedFd(dup.detach())


class _SlotBuffers:
    """``SampleSource``'s buffer hook in a reader process: the read buffers of the batch being read lie in
    its slot of the shared mapping."""

    def __init__(self, memory: np.ndarray, layout: SlotLayout):
        self.memory = memory
        self.layout = layout
        self.base = 0

    def __call__(self, key: tuple, nbytes: int) -> np.ndarray:
        at = self.base + self.layout.place(key, nbytes)
        return self.memory[at : at + nbytes]


def _describe(out, memory: np.ndarray, files: list[MappedFile]) -> tuple:
    """The source's outputs with every array replaced by where it lies: ("slot", offset in the shared
    memory, shape, dtype), or ("file", offset in the mapped file, shape, dtype, the file's identity) for
    an array of one of ``files``; an array elsewhere (not expected) travels whole, as a copy."""
    address = memory.__array_interface__["data"][0]
    files = sorted(files, key=lambda f: f.address)
    starts = [f.address for f in files]
    described = []
    for item in out:
        if not isinstance(item, list):
            described.append(item)
            continue
        arrays = []
        for arr in item:
            at = arr.__array_interface__["data"][0]
            if arr.flags.c_contiguous:
                if address <= at and at + arr.nbytes <= address + memory.nbytes:
                    arrays.append(("slot", at - address, arr.shape, arr.dtype.str))
                    continue
                k = bisect.bisect_right(starts, at) - 1
                if k >= 0 and at + arr.nbytes <= starts[k] + files[k].data.nbytes:
                    f = files[k]
                    where = (f.path, f.device, f.inode, f.pid, f.held.fd)
                    arrays.append(("file", at - f.address, arr.shape, arr.dtype.str, where))
                    continue
            arrays.append(np.array(arr, order="C"))  # a copy: the queue pickles it later, in a thread
        described.append(arrays)
    return tuple(described)


class _MappedFiles:
    """The shard files that reader processes hand over in place (``storage.MappedFile``), mapped read-only
    in the pipeline's process.

    A file is opened by its path, or, where that path now names another file or none (a node-cache copy
    evicted or replaced since the reader checked it), through the reader's own descriptor
    (``/proc/<pid>/fd/<fd>``); either way only the very file the reader checked is mapped. Each batch maps
    its files afresh (``begin``), and a batch's mappings are dropped ``hold`` hand-overs later, when its
    slot would be written again: DALI reads a no-copy input without holding a reference to it. So this
    process maps the pages of the last ``hold`` batches only, however large the dataset, and every
    sample's pages are mapped once, as a ``pread`` copies every sample's bytes once.
    """

    def __init__(self, hold: int):
        self.hold = hold
        self._batches: deque[dict[tuple[int, int], mmap.mmap]] = deque()  # per hand-over: (dev, inode) ->

    def __len__(self) -> int:
        return sum(len(maps) for maps in self._batches)

    def begin(self) -> None:
        """A new batch: the mappings of the one ``hold`` hand-overs back are dropped (unmapped once no array
        made from them is left)."""
        self._batches.append({})
        while len(self._batches) > self.hold:
            self._batches.popleft()

    def array(self, where: tuple, at: int, shape: tuple, dtype: str) -> np.ndarray:
        """The array at byte ``at`` of the file ``where`` (path, device, inode, reader pid, reader fd), its
        pages mapped here now: what DALI's first read of them would cost, in this callback instead."""
        path, device, inode, pid, fd = where
        maps = self._batches[-1]
        memory = maps.get((device, inode))
        if memory is None:
            memory = maps[(device, inode)] = self._map(path, device, inode, pid, fd)
        arr = np.ndarray(shape, np.dtype(dtype), buffer=memory, offset=at)
        try:
            populated = map_pages(memory, at, arr.nbytes)
        except PagesGone:
            raise ReaderFailed(
                f"{path}: bytes {at}-{at + arr.nbytes} are no longer in the file: it was cut short after a "
                f"reader checked them (a shard file must not change while a run reads it)"
            ) from None
        if not populated:
            arr.reshape(-1).view(np.uint8)[:: mmap.PAGESIZE].max(initial=0)
        return arr

    @staticmethod
    def _map(path: str, device: int, inode: int, pid: int, fd: int) -> mmap.mmap:
        for candidate in (path, f"/proc/{pid}/fd/{fd}"):
            try:
                opened = os.open(candidate, os.O_RDONLY)
            except OSError:
                continue
            try:
                st = os.fstat(opened)
                if (st.st_dev, st.st_ino) == (device, inode):
                    return mmap.mmap(opened, st.st_size, prot=mmap.PROT_READ)
            finally:
                os.close(opened)
        raise ReaderFailed(
            f"{path}: the shard file a reader checked can no longer be opened by the pipeline's process "
            f"(removed or replaced, and the reader has closed it); map_files=False reads without mapping"
        )


def _serve(
    source: SampleSource,
    fd: _SharedFd,
    nbytes: int,
    layout: SlotLayout,
    slots: int,
    tasks,
    results,
    parent: int,
):
    """A reader process: read the batches ``tasks`` names into their slots, report each on ``results``.

    The files a batch hands over stay open here (``HeldFile``) for ``slots`` more of this reader's batches:
    by then the pipeline's process has mapped them (it has handed that batch over before it asks for a
    batch ``ahead`` later), even where the node cache has meanwhile evicted a copy and closed its
    descriptor."""
    lift_open_file_limit()
    mapping = mmap.mmap(fd.fd, nbytes, flags=_MAP_FLAGS)
    os.close(fd.fd)
    memory = np.frombuffer(mapping, dtype=np.uint8)
    buffers = _SlotBuffers(memory, layout)
    source.use_buffers(buffers)
    held: deque[list] = deque(maxlen=slots)
    while True:
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        epoch_idx, iteration, slot = task
        buffers.base = slot * layout.nbytes
        try:
            out = source(SimpleNamespace(epoch_idx=epoch_idx, iteration=iteration))
            files = source.reader.mapped_files()
            held.append([f.held for f in files])
            results.put((epoch_idx, iteration, "ok", _describe(out, memory, files)))
        except StopIteration:
            results.put((epoch_idx, iteration, "stop", None))
        except BaseException as exc:  # noqa: BLE001 - reported to the pipeline's process, which raises it
            text = "".join(traceback.format_exception(exc)).rstrip()
            results.put((epoch_idx, iteration, "error", f"{text}\n{type(exc).__name__}: {exc}"))


class SharedMemoryReaders:
    """A batch callable for a (non-parallel, ``no_copy``) DALI external source, fed by ``workers`` reader
    processes that read ``source``'s batches into shared memory. See the module docstring."""

    def __init__(self, source: SampleSource, workers: int, prefetch: int, timeout_s: float):
        if workers < 1:
            raise ValueError(f"shared-memory readers need workers >= 1, got {workers}")
        self.source = source
        self.layout = SlotLayout.for_source(source)
        self.ahead = workers + 1  # every reader busy, and one batch queued behind them
        self.slots = self.slot_count(workers, prefetch)
        self.timeout_s = timeout_s
        nbytes = self.layout.nbytes * self.slots
        lift_open_file_limit()  # this process maps the files of the last ``slots`` batches
        self._fd = os.memfd_create("eossl-readers", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, nbytes)
        self._mapping = mmap.mmap(self._fd, nbytes, flags=_MAP_FLAGS)
        ctx = multiprocessing.get_context("spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        args = (
            source,
            _SharedFd(self._fd),
            nbytes,
            self.layout,
            self.slots,
            self._tasks,
            self._results,
            os.getpid(),
        )
        self._procs = [
            ctx.Process(target=_serve, args=args, name=f"eossl-reader-{i}") for i in range(workers)
        ]
        for proc in self._procs:
            proc.daemon = True
            proc.start()
        os.close(self._fd)  # the readers hold their own descriptors; the mapping keeps the memory
        self._closer = weakref.finalize(self, _stop, self._procs, self._tasks)
        self._epoch_idx = -1
        self._steps = 0
        self._submitted = 0  # iterations of the current epoch handed to the readers
        self._sequence = 0  # batches handed over since the start: the slot of the next one
        self._done: dict[tuple[int, int], tuple] = {}
        self._files = _MappedFiles(hold=self.slots)
        self._lock = threading.Lock()

    @staticmethod
    def slot_count(workers: int, prefetch: int) -> int:
        """Batches the shared memory holds: ``ahead`` (workers + 1) being read, ``prefetch`` held by DALI,
        one being handed over and one spare."""
        return workers + 1 + prefetch + 2

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def close(self) -> None:
        """Stop the reader processes (idempotent)."""
        self._closer()

    # -- the callback ----------------------------------------------------------------------------------
    def _epoch_steps(self, epoch_idx: int) -> int:
        epoch = self.source.start.epoch + epoch_idx
        first = self.source.start.step if epoch_idx == 0 else 0
        return max(self.source.plan(epoch).steps - first, 0)

    def _submit_until(self, iteration: int) -> None:
        while self._submitted < min(iteration + self.ahead, self._steps):
            self._tasks.put((self._epoch_idx, self._submitted, self._sequence % self.slots))
            self._submitted += 1
            self._sequence += 1

    def _check_alive(self) -> None:
        # From /proc, not ``is_alive``: where SIGCHLD is ignored a dead child is reaped at once and
        # ``waitpid`` fails, which ``multiprocessing`` reads as alive.
        dead = dead_processes([p.pid for p in self._procs])
        if dead:
            raise ReaderGone(
                f"reader worker process(es) {', '.join(map(str, dead))} died (killed, or out of memory)"
            )

    def _wait(self, key: tuple[int, int]) -> tuple:
        deadline = time.monotonic() + self.timeout_s
        while key not in self._done:
            try:
                epoch_idx, iteration, status, payload = self._results.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no batch from the reader processes in {self.timeout_s:.0f} s (epoch index "
                        f"{key[0]}, iteration {key[1]}): a reader is stuck (storage that stopped answering?)"
                    ) from None
                continue
            if epoch_idx == self._epoch_idx:  # batches of an epoch DALI left behind are dropped
                self._done[(epoch_idx, iteration)] = (status, payload)
        return self._done.pop(key)

    def _arrays(self, described: tuple) -> tuple:
        out = []
        for item in described:
            if not isinstance(item, list):
                out.append(item)
                continue
            arrays = []
            for d in item:
                if not isinstance(d, tuple):  # a copy
                    arrays.append(d)
                elif d[0] == "slot":
                    arrays.append(np.ndarray(d[2], np.dtype(d[3]), buffer=self._mapping, offset=d[1]))
                else:
                    arrays.append(self._files.array(d[4], d[1], d[2], d[3]))
            out.append(arrays)
        return tuple(out)

    def __call__(self, info) -> tuple:
        with self._lock:
            if info.epoch_idx != self._epoch_idx:
                self._epoch_idx, self._steps = info.epoch_idx, self._epoch_steps(info.epoch_idx)
                self._submitted, self._done = 0, {}
            if info.iteration >= self._steps:
                raise StopIteration
            # A reader that died idle holds no batch the wait below would miss: look at every call (a
            # non-blocking waitpid per reader), not only when a batch is late.
            self._check_alive()
            self._submit_until(info.iteration)
            status, payload = self._wait((info.epoch_idx, info.iteration))
            if status == "error":
                raise ReaderFailed(payload)
            if status == "stop":  # the plan and the readers disagree on the epoch's length: never expected
                raise RuntimeError(f"a reader found epoch index {info.epoch_idx} over at {info.iteration}")
            self._files.begin()
            return self._arrays(payload)


def _stop(procs: list, tasks) -> None:
    for _ in procs:
        try:
            tasks.put(None)
        except (OSError, ValueError):
            break
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
