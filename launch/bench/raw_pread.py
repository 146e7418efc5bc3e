"""The floor of the loader's read path: a raw ``preadv`` of each sample's S1+S2 span, nothing else.

``RawPreads`` reads an epoch's spans in the epoch's order, in ``processes`` processes that share the
batches as the loader's reader processes do (those take the next batch when free; here batch j goes to
process j mod processes): the same bytes under the same parallelism, so the floor sees the same
contention for memory and caches as the reader it is compared with. Each span goes into one reused
buffer (hot in the caches), or with ``batches`` into a sample's place in that many batch-sized buffers
in turn (where a batch must be written for the pipeline: far more memory than the caches hold).

Processes are spawned and import only NumPy; they wait for the next epoch on a pipe and exit when it
closes or their parent is gone. Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection

import numpy as np

from eossl.streaming.loader import SSLLoader

__all__ = ["RawPreads", "epoch_spans"]

EPOCH_TIMEOUT_S = 600.0  # one epoch of preads; far beyond what any bench dataset takes


def epoch_spans(loader: SSLLoader) -> tuple[dict[int, str], list[tuple[int, int, int]], int]:
    """(shard -> path, (shard, offset, size) per sample of epoch 0 in order, the largest span)."""
    cat, sensors = loader.catalog, loader.views.sensors
    order = loader.plan(0).order
    shard = cat.shard[order]
    start = np.min([cat.offset[s][order] for s in sensors], axis=0)
    end = np.max([cat.offset[s][order] + cat.size[s][order] for s in sensors], axis=0)
    paths = {int(i): str(loader.sample_source().reader.url(int(i))) for i in np.unique(shard)}
    spans = list(zip(shard.tolist(), start.tolist(), (end - start).tolist(), strict=True))
    return paths, spans, int((end - start).max())


class _Reader:
    """One process's share of the preads and its buffer (touched once here, as a mapped slot is)."""

    def __init__(self, paths: dict[int, str], spans: list, stride: int, places: int):
        self.fds = {i: os.open(p, os.O_RDONLY) for i, p in paths.items()}
        self.spans, self.stride, self.places = spans, stride, places
        self.buffer = memoryview(np.zeros(places * stride, np.uint8))
        self.at = 0

    def epoch(self) -> int:
        for shard, offset, size in self.spans:
            place = self.at % self.places * self.stride
            os.preadv(self.fds[shard], [self.buffer[place : place + size]], offset)
            self.at += 1
        return len(self.spans)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _serve(
    paths: dict[int, str], spans: list, stride: int, places: int, conn: Connection, parent: int
) -> None:
    reader = _Reader(paths, spans, stride, places)
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            if conn.recv() is None:
                return
            conn.send(reader.epoch())
    except (EOFError, OSError):  # the bench closed its end
        return
    finally:
        reader.close()


class RawPreads:
    """An epoch callable (``harness.Epochs``): every sample's span read once, returns the sample count."""

    def __init__(self, loader: SSLLoader, batches: int = 0, processes: int = 1):
        paths, spans, stride = epoch_spans(loader)
        size = loader.cfg.batch_size
        self.samples = len(spans)
        processes = max(processes, 1)
        # batch j to process j mod processes, as the reader processes take them
        shares = [[s for i, s in enumerate(spans) if i // size % processes == k] for k in range(processes)]
        places = max(-(-batches // processes), 1) * size if batches else 1
        self._local = _Reader(paths, spans, stride, places) if processes == 1 else None
        self._procs, self._conns = [], []
        if self._local is None:
            ctx = multiprocessing.get_context("spawn")
            for share in shares:
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=_serve, args=(paths, share, stride, places, theirs, os.getpid()), daemon=True
                )
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(ours)

    def __call__(self) -> int:
        if self._local is not None:
            return self._local.epoch()
        for conn in self._conns:
            conn.send(True)
        done = 0
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if not conn.poll(EPOCH_TIMEOUT_S):
                raise TimeoutError(
                    f"raw pread process {proc.pid} did not finish an epoch in {EPOCH_TIMEOUT_S:.0f} s"
                )
            done += conn.recv()
        return done

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        for proc in self._procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)

    def __enter__(self) -> RawPreads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
