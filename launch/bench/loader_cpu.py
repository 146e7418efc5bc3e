"""CPU cost of the loader's stages against their floors, measured in one run of ``eossl bench loader``.

Each number is a ratio of CPU-milliseconds per sample of two sides timed in the same run, interleaved:

- ``read_cpu_over_raw_pread``: the reader as a GPU node runs it, on its CPU (the loader's reader
  processes, ``shared_readers``: ``SampleSource`` reading into shared memory, each batch handed to DALI
  in place and held there, ``_held``; no graph: on a GPU node that is on the GPU), over a raw ``preadv``
  of the same S1+S2 bytes of every sample in the epoch's order into one reused buffer, in as many
  processes as the reader has (``raw_pread.RawPreads``: the cost of the bytes alone, under the same
  contention for memory and caches). With ``map_files`` (the default) the reader copies no byte: its cost
  is the member checksums (each byte read once, from memory), mapping each sample's pages in the reader
  and again in the pipeline's process (``shared_readers._MappedFiles`` maps them as it hands a batch
  over, where DALI's first read of them would otherwise; every batch maps its files afresh, so a small
  bench dataset costs per sample what a full-size one does), the view-parameter draws and the hand-over.
  ``read_cpu_over_raw_pread_into_batches``: the same reader over the same preads into a sample's place
  in as many batch-sized buffers as the readers' shared memory holds, in turn: a batch of 32 is ~70 MB,
  beyond the caches, so every byte also costs its trip to memory; the part of the reader's cost that
  comes from where a batch has to be, whatever reads it. ``read_cpu_over_raw_pread_one_process``: over
  the raw preads in one process while the other cores idle (the floor with the memory system to itself).
  ``transport_over_raw_pread``: DALI's parallel external source alone (``PreparedBatches``: batches of the
  same arrays, nothing read), what ``readers='dali'`` adds to the reading: a copy of every batch between
  processes.
- ``read_stage_cpu_over_raw_pread``: the whole read stage in DALI's CPU mode (``read`` of the bench: adds
  band selection, standardisation and the S1+S2 concatenation on the CPU) over the same raw pread.
- ``augment_cpu_over_torch``: the loader's augmentation in CPU mode (``torch_augment.augment_batch``: a
  batch per call, what ``SSLLoader`` runs after DALI's CPU graph has standardised the batch) against the
  torch reference (``torch_view`` per sample, then collated into a batch, as the DataLoader baseline's
  workers run it) on the same standardised samples with the same parameters, in this process, one thread
  each (with more, torch's OpenMP threads spin while they wait, which inflates its CPU time several times
  over on a loaded machine). Below 1: the loader's CPU mode is cheaper. ``dali_graph_over_torch``: the
  same views by DALI's graph on the CPU (``augment_view``: ``warp_affine``, arithmetic,
  ``gaussian_blur``), what a GPU runs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from eossl.streaming.loader import LoaderConfig, SSLLoader
from eossl.streaming.shared_readers import SharedMemoryReaders

from .geotiff_baseline import torch_view
from .harness import Epochs, timed_run, wait_idle
from .loader_sides import cpu_reader_pipeline
from .raw_pread import RawPreads

MIN_CPU_S = 0.5
"""CPU seconds each side of a CPU ratio runs at least: 50 ticks of the /proc clock (1 % resolution)."""

__all__ = ["PreparedBatches", "augment_cpu", "interleaved", "read_cpu", "reader_epochs"]


def interleaved(sides: dict[str, Epochs], min_samples: int, repeat: int, cpu=None) -> dict:
    """Median CPU-ms per sample and samples/s of each side over ``repeat`` interleaved rounds (after one
    warm-up epoch each). ``cpu``: the CPU clock (default: the process tree's, from /proc)."""
    for epochs in sides.values():
        epochs()
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeat):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            wait_idle()
            if cpu is None:
                runs[name].append(timed_run(sides[name], min_samples, min_cpu_s=MIN_CPU_S))
                continue
            c0, t0, n = cpu(), time.perf_counter(), 0
            while n < min_samples or cpu() - c0 < MIN_CPU_S:
                n += sides[name]()
            runs[name].append(
                {
                    "cpu_ms_per_sample": 1000 * (cpu() - c0) / n,
                    "samples_per_s": n / (time.perf_counter() - t0),
                }
            )
    return {
        name: {
            "cpu_ms_per_sample": round(float(np.median([r["cpu_ms_per_sample"] for r in rs])), 3),
            "samples_per_s": round(float(np.median([r["samples_per_s"] for r in rs])), 1),
        }
        for name, rs in runs.items()
    }


def _held(arrays: dict, ids, _params) -> tuple:
    """The end of the reader's side: DALI holds the batch (what its graph's first operator reads in place;
    on a GPU the copy to the device). Only the arrays' shapes and the ids come out: making the arrays
    themselves the pipeline's outputs would add a copy of every byte that no real pipeline makes."""
    return (*(a.shape() for a in arrays.values()), ids)


class PreparedBatches:
    """A batch callable with the outputs of the loader's ``SampleSource`` (the same structure, shapes and
    dtypes: lists of HWC arrays, ids, view parameters) that reads nothing: its arrays are made once in the
    worker and handed over at every call. In DALI's parallel external source it times the transport
    alone (the worker's copy into shared memory, the pipeline's side)."""

    def __init__(self, template: tuple, steps: int):
        self.layout = [
            ("list", [(a.shape, a.dtype.str) for a in out])
            if isinstance(out, list)
            else (out.shape, out.dtype.str)
            for out in template
        ]
        self.steps = steps
        self._outputs: tuple | None = None

    def __call__(self, info) -> tuple:
        if info.iteration >= self.steps:
            raise StopIteration
        if self._outputs is None:
            self._outputs = tuple(
                [np.ones(shape, dtype) for shape, dtype in spec[1]]
                if spec[0] == "list"
                else np.ones(spec[0], spec[1])
                for spec in self.layout
            )
        return self._outputs


@contextmanager
def reader_epochs(dataset: str, cfg: LoaderConfig, prepared: bool = False) -> Iterator[Epochs]:
    """Epochs of the loader's reader processes, batches handed to DALI and nothing else (what a GPU node's
    CPU does before the graph). ``prepared``: DALI's parallel external source handing over the same
    batches without reading (``PreparedBatches``)."""
    from types import SimpleNamespace

    loader = SSLLoader(dataset, cfg, rank=0, world_size=1)
    source = None
    if prepared:
        template = loader.sample_source()(SimpleNamespace(epoch_idx=0, iteration=0))
        source = PreparedBatches(template, len(loader))
    pipe = cpu_reader_pipeline(loader, _held, cfg.prefetch, source)
    with warnings.catch_warnings():  # the view parameters are drawn (a real cost of the source) but unused
        warnings.filterwarnings("ignore", message="The external source node")
        pipe.build()

    def epoch() -> int:
        n = 0
        while True:
            try:
                n += len(pipe.run()[0])
            except StopIteration:
                pipe.reset()
                return n

    yield epoch


def read_cpu(dataset: str, cfg: LoaderConfig, probe: SSLLoader, min_samples: int, repeat: int) -> dict:
    """``read_cpu_over_raw_pread`` and what it is made of (see module docstring)."""
    slots = SharedMemoryReaders.slot_count(cfg.workers, cfg.prefetch)
    with (
        reader_epochs(dataset, cfg) as reader,
        reader_epochs(dataset, cfg, prepared=True) as transport,
        RawPreads(probe, processes=max(cfg.workers, 1)) as raw,
        RawPreads(probe, batches=slots, processes=max(cfg.workers, 1)) as into_batches,
        RawPreads(probe) as one_process,
    ):
        sides = interleaved(
            {
                "reader": reader,
                "raw_pread": raw,
                "raw_pread_into_batches": into_batches,
                "raw_pread_one_process": one_process,
                "transport": transport,
            },
            min_samples,
            repeat,
        )
    return {
        **sides,
        "processes": max(cfg.workers, 1),
        "ratio": cpu_ratio(sides["reader"], sides["raw_pread"]),
        "over_raw_pread_into_batches": cpu_ratio(sides["reader"], sides["raw_pread_into_batches"]),
        "over_raw_pread_one_process": cpu_ratio(sides["reader"], sides["raw_pread_one_process"]),
        "transport_over_raw_pread": cpu_ratio(sides["transport"], sides["raw_pread"]),
    }


def cpu_ratio(side: dict, reference: dict) -> float:
    """CPU-ms per sample of ``side`` over that of ``reference`` (both measured for at least ``MIN_CPU_S``)."""
    if not reference["cpu_ms_per_sample"]:
        raise RuntimeError(f"no CPU time measured for the reference side {reference}: is /proc readable?")
    return round(side["cpu_ms_per_sample"] / reference["cpu_ms_per_sample"], 2)


def _standardised_batch(loader: SSLLoader, batch_size: int) -> np.ndarray:
    """(B, 256, 256, C) float32 standardised S1+S2 samples of the loader's first batch (numpy, HWC)."""
    from types import SimpleNamespace

    from eossl.ingest.bands import S2

    source = loader.sample_source()
    out = source(SimpleNamespace(epoch_idx=0, iteration=0))
    spec = loader.views.input_spec
    parts = []
    for k, sensor in enumerate(loader.views.sensors):
        x = np.stack(out[k]).astype(np.float32)
        if sensor == "s2":
            x = x[..., spec.s2_index] if len(spec.s2_index) != len(S2.bands) else x
        elif spec.s1_clip is not None:
            x = np.clip(x, *spec.s1_clip)
        mean, std = loader.norm[sensor]
        parts.append((x - mean) / std)
    return np.ascontiguousarray(np.concatenate(parts, axis=-1)[:batch_size])


def _constant(value):
    """A source that returns ``value`` on every call (a lambda with a default would receive DALI's
    iteration number)."""
    return lambda: value


def augment_cpu(loader: SSLLoader, threads: int, min_samples: int, repeat: int) -> dict:
    """``augment_cpu_over_torch`` (see module docstring): the same samples, views and threads."""
    from nvidia.dali import fn, pipeline_def

    from eossl.streaming.dali_pipeline import augment_view
    from eossl.streaming.torch_augment import augment_batch

    batch = _standardised_batch(loader, loader.cfg.batch_size)
    b = len(batch)
    views = loader.views.views
    draws = [loader.views.draw(loader.cfg.plan.seed, 0, i) for i in range(b)]
    params = [
        [np.stack([getattr(d[v], name) for d in draws]) for name in ("matrix", "gain", "offset", "sigma")]
        for v in range(len(views))
    ]

    @pipeline_def(
        batch_size=b, num_threads=threads, device_id=None, exec_dynamic=True, seed=0, prefetch_queue_depth=1
    )
    def pipeline():
        x = fn.external_source(source=_constant(batch), batch=True, layout="HWC", no_copy=True)
        out = []
        for v, view in enumerate(views):
            m, g, o, s = (
                fn.external_source(source=_constant(a), batch=True, no_copy=True) for a in params[v]
            )
            out.append(augment_view(x, m, g, o, s, view.size))
        return tuple(out)

    pipe = pipeline()
    pipe.build()

    def dali_graph() -> int:  # one iteration, no prefetch: its work falls inside the timed window
        pipe.schedule_run()
        pipe.outputs()
        return b

    chw = torch.from_numpy(batch).permute(0, 3, 1, 2)  # channels-last strides, as the loader hands them
    torch_params = [[torch.from_numpy(a) for a in ps] for ps in params]

    def cpu_mode() -> int:
        for v, view in enumerate(views):
            augment_batch(chw, *torch_params[v], view.size)
        return b

    def reference() -> int:  # views per sample, collated into a batch per view as a DataLoader does
        for v, view in enumerate(views):
            torch.stack([torch_view(chw[i], draws[i][v], view.size) for i in range(b)])
        return b

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sides = interleaved(
            {"cpu_mode": cpu_mode, "torch": reference, "dali_graph": dali_graph},
            min_samples,
            repeat,
            cpu=time.process_time,
        )
    finally:
        torch.set_num_threads(threads_before)

    return {
        **sides,
        "threads": threads,
        "ratio": cpu_ratio(sides["cpu_mode"], sides["torch"]),
        "dali_graph_over_torch": cpu_ratio(sides["dali_graph"], sides["torch"]),
    }
