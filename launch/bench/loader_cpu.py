"""CPU cost of the loader's stages against their floors, measured in one run of ``eossl bench loader``.

Each number is a ratio of CPU-milliseconds per sample of two sides timed in the same run, interleaved:

- ``read_cpu_over_raw_pread``: the reader as a GPU node runs it, on its CPU (``SampleSource`` in DALI's
  parallel external source workers, each batch handed to DALI; no graph: on a GPU node that is on the
  GPU), over a raw ``preadv`` of the same S1+S2 bytes of every sample in the epoch's order into one reused
  buffer (one process: the cost of the bytes alone). The reader's extra cost is the member checksums, the
  view-parameter draws and DALI's transport between processes.
- ``read_stage_cpu_over_raw_pread``: the whole read stage in DALI's CPU mode (``read`` of the bench: adds
  band selection, standardisation and the S1+S2 concatenation on the CPU) over the same raw pread.
- ``augment_cpu_over_torch``: the loader's augmentation graph in DALI's CPU mode (``augment_view``:
  ``warp_affine``, per-band gain/offset, Gaussian blur) against ``torch_view`` (``grid_sample``, the same
  jitter, torchvision's blur) on the same standardised samples with the same parameters, in this process,
  one thread each (as the DataLoader baseline's workers run torch: with more, torch's OpenMP threads
  spin while they wait, which inflates its CPU time several times over on a loaded machine). Below 1:
  DALI's CPU mode is cheaper. ``geometry_ratio``: the
  resampling alone (``warp_affine`` against ``grid_sample``), since the two sides' blurs differ in cost
  (torchvision convolves with a 2-D kernel, DALI with separable 1-D ones).
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from eossl.streaming.loader import LoaderConfig, SSLLoader

from .geotiff_baseline import torch_view
from .harness import Epochs, timed_run, wait_idle
from .loader_sides import cpu_reader_pipeline

MIN_CPU_S = 0.5
"""CPU seconds each side of a CPU ratio runs at least: 50 ticks of the /proc clock (1 % resolution)."""

__all__ = ["augment_cpu", "interleaved", "raw_pread_epochs", "read_cpu", "reader_epochs"]


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


def raw_pread_epochs(loader: SSLLoader) -> Epochs:
    """One epoch of raw ``preadv`` calls: each sample's S1+S2 span, in the epoch's order, one buffer."""
    cat, sensors = loader.catalog, loader.views.sensors
    order = loader.plan(0).order
    shard = cat.shard[order]
    start = np.min([cat.offset[s][order] for s in sensors], axis=0)
    end = np.max([cat.offset[s][order] + cat.size[s][order] for s in sensors], axis=0)
    paths = {int(i): str(loader.sample_source().reader.url(int(i))) for i in np.unique(shard)}
    buf = memoryview(bytearray(int((end - start).max())))
    spans = list(zip(shard.tolist(), start.tolist(), (end - start).tolist(), strict=True))
    fds = {i: os.open(p, os.O_RDONLY) for i, p in paths.items()}

    def epoch() -> int:
        for i, offset, size in spans:
            os.preadv(fds[i], [buf[:size]], offset)
        return len(spans)

    weakref.finalize(epoch, lambda: [os.close(fd) for fd in fds.values()])  # closed with the callable
    return epoch


@contextmanager
def reader_epochs(dataset: str, cfg: LoaderConfig) -> Iterator[Epochs]:
    """Epochs of the loader's ``SampleSource`` in DALI's parallel external source, batches handed to DALI
    and nothing else (what a GPU node's CPU does before the graph)."""
    loader = SSLLoader(dataset, cfg, rank=0, world_size=1)
    pipe = cpu_reader_pipeline(
        loader, lambda arrays, ids, params: (*arrays.values(), ids, *params), cfg.prefetch
    )
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
    with reader_epochs(dataset, cfg) as reader:
        sides = interleaved({"reader": reader, "raw_pread": raw_pread_epochs(probe)}, min_samples, repeat)
    return {**sides, "ratio": cpu_ratio(sides["reader"], sides["raw_pread"])}


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
    from nvidia.dali import fn, pipeline_def, types

    from eossl.streaming.dali_pipeline import augment_view

    batch = _standardised_batch(loader, loader.cfg.batch_size)
    b = len(batch)
    views = loader.views.views
    draws = [loader.views.draw(loader.cfg.plan.seed, 0, i) for i in range(b)]
    params = [
        [np.stack([getattr(d[v], name) for d in draws]) for name in ("matrix", "gain", "offset", "sigma")]
        for v in range(len(views))
    ]

    def graph(geometry_only: bool):
        @pipeline_def(
            batch_size=b,
            num_threads=threads,
            device_id=None,
            exec_dynamic=True,
            seed=0,
            prefetch_queue_depth=1,
        )
        def pipeline():
            x = fn.external_source(source=_constant(batch), batch=True, layout="HWC", no_copy=True)
            out = []
            for v, view in enumerate(views):
                m, g, o, s = (
                    fn.external_source(source=_constant(a), batch=True, no_copy=True) for a in params[v]
                )
                if geometry_only:
                    out.append(
                        fn.warp_affine(
                            x,
                            matrix=m,
                            size=[view.size] * 2,
                            inverse_map=True,
                            interp_type=types.INTERP_LINEAR,
                            fill_value=0.0,
                        )
                    )
                else:
                    out.append(augment_view(x, m, g, o, s, view.size))
            return tuple(out)

        pipe = pipeline()
        pipe.build()

        def epoch() -> int:  # one iteration, no prefetch: its work falls inside the timed window
            pipe.schedule_run()
            pipe.outputs()
            return b

        return epoch

    chw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    torch_params = [[d[v] for d in draws] for v in range(len(views))]
    unit = [
        [
            replace(p, gain=np.ones_like(p.gain), offset=np.zeros_like(p.offset), sigma=np.float32(0))
            for p in ps
        ]
        for ps in torch_params
    ]

    def torch_epochs(per_view: list[list]):
        def epoch() -> int:
            for i in range(b):
                for v, view in enumerate(views):
                    torch_view(chw[i], per_view[v][i], view.size)
            return b

        return epoch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sides = interleaved(
            {
                "dali_cpu": graph(False),
                "torch": torch_epochs(torch_params),
                "dali_cpu_warp_only": graph(True),
                "torch_grid_sample_only": torch_epochs(unit),
            },
            min_samples,
            repeat,
            cpu=time.process_time,
        )
    finally:
        torch.set_num_threads(threads_before)

    return {
        **sides,
        "threads": threads,
        "ratio": cpu_ratio(sides["dali_cpu"], sides["torch"]),
        "geometry_ratio": cpu_ratio(sides["dali_cpu_warp_only"], sides["torch_grid_sample_only"]),
    }
