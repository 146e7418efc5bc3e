"""Loader benchmark: samples/s of the streaming loader against per-patch GeoTIFF reads in a torch DataLoader.

What is compared, in one run, on the same patches, from a warm page cache, with the same number of CPU
workers and the same batch size on both sides (``bench_loader``):

- **read** (read + decode + standardise, no augmentation; sides in ``loader_sides``, ``geotiff_baseline``).
  *Ours*: the loader's real reading path, i.e. ``SampleSource`` (one ``pread`` per sample from the shards,
  ``.npy`` view, S2 band selection, S1 NaN fill, epoch plan, view-parameter draw) in DALI's parallel
  external source workers, then the loader's own ``standardise`` (S1 clip, per-channel mean/std) and the
  S1+S2 concatenation in a DALI CPU graph: one (B, 12, 256, 256) float32 batch. *Baseline*: a map-style
  torch ``Dataset`` that opens the sample's S1 and S2 GeoTIFFs with rasterio (reading only the selected S2
  bands, as float32), fills S1 NaNs, clips and standardises with torch ops on whole tensors, in
  ``DataLoader(num_workers=W, shuffle=True)``. Both produce the same values (tests/test_launch_bench.py
  checks it to 1e-4).
- **augment**: the default MoCo-style two-view augmentation at 224 px of S1+S2 (``SSLLoader``, DALI CPU
  mode) against the same baseline reads followed, per view, by the *same* parameters (``ViewSet.draw``)
  applied with torch: ``affine_grid``/``grid_sample`` (bilinear), per-band gain/offset, ``torchvision``
  Gaussian blur with DALI's window (skipped when the view draws no blur). Given the same position, the two
  sides' views agree to ~3e-3 in standardised units (tested).
- **CPU against floors** (``loader_cpu``): the reader's CPU per sample over a raw ``preadv`` of the same
  bytes (``read_cpu_over_raw_pread``), the whole CPU-mode read stage over the same, and the loader's
  CPU-mode augmentation over the torch reference's, per sample, of the same samples and parameters
  (``augment_cpu_over_torch``; DALI's graph on the CPU: ``dali_graph_over_torch``).
- **from S3** (``s3_source``/``s3_dataset``, or ``local_s3``; ``loader_s3``): both stages again with both
  sides reading from the object store: the baseline opens ``s3://`` GeoTIFFs with rasterio (GDAL
  ``/vsis3/``); ours reads the shards through a node-local shard cache (filled by the warm-up epoch) and,
  separately, without one (ranged GETs, ``requests_in_flight`` at a time). With ``local_s3`` a latency
  model (``s3_latency_ms``, ``s3_bandwidth_mb_s``) sits between both sides and the server.

Timing (``harness``): both sides of a stage are alive together; after one warm-up epoch each, ``repeat``
rounds of interleaved runs (ours, baseline, then baseline, ours, ...) so that a shared machine's changing
load hits both alike. Each run waits until the other side's background work has stopped (DALI prefetches the
next epoch as soon as one ends), delivers one untimed lead-in epoch (so it starts in steady state), then
whole epochs, at least two and at least ``samples`` samples. Reported: the median samples/s of each side,
the median of the per-round ratios (the speedups), and CPU-milliseconds per sample of our process tree (the
bench process and its workers, from /proc), whose ratio is the ``cpu_efficiency``: it moves much less with
other load, unlike wall-clock rates. Baseline workers run torch with one thread (``worker_init_fn``), as a
tuned DataLoader would on a small machine; ours uses the loader's own settings (``workers`` reader
processes, ``workers`` DALI threads).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from eossl.streaming.loader import SSLLoader

from .configs import LoaderBenchConfig
from .geotiff_baseline import geotiff_files
from .harness import machine_info, single, write_sample_dataset
from .loader_cpu import augment_cpu, read_cpu
from .loader_s3 import bench_local_s3, bench_s3
from .loader_sides import SENSORS, Setup, loader_configs, loader_epochs, read_path_epochs, shard_paths

__all__ = ["GOALS", "bench_loader"]

GOALS = {"read": 20.0, "augment": 5.0}


def _warm_page_cache(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(16 * 2**20):
                total += len(chunk)
    return total


def _settings(cfg: LoaderBenchConfig, inputs: list[str]) -> dict:
    """What the result says was compared, and how (the words printed with every number)."""
    workers, batch_size = cfg.workers, cfg.batch_size
    return {
        "workers": workers,
        "batch_size": batch_size,
        "samples_per_run": cfg.samples,
        "repeat": cfg.repeat,
        "max_samples": cfg.max_samples,
        "statistic": "median",
        "seed": cfg.seed,
        "split": "all",
        "device": "cpu (DALI CPU mode)",
        "inputs": inputs,
        "read": "read + decode + S1 NaN fill/clip + standardise + stack -> (B, 12, 256, 256) float32",
        "augment": "ViewConfig(mode='single', s1+s2 land bands, size=224), default AugmentConfig: 2 views",
        "ours": (
            f"shared-memory reader processes (SampleSource, {workers} workers) + DALI external source"
            if workers
            else "DALI external source (SampleSource, in process)"
        )
        + f" + DALI CPU graph ({max(workers, 1)} threads)",
        "baseline": f"rasterio per GeoTIFF + torch ops in DataLoader(num_workers={workers}, "
        f"batch_size={batch_size}, shuffle=True, persistent_workers=True), 1 torch thread/worker",
        "page_cache": "warm (every GeoTIFF and shard read once before timing)",
    }


def bench_loader(cfg: LoaderBenchConfig) -> dict:
    """Samples/s of the streaming loader against GeoTIFFs + torch ``DataLoader``, read and augment.

    Args:
        cfg: what to bench and how (see ``LoaderBenchConfig``; its checks ran when it was made).

    Returns:
        A JSON-ready dict: machine, settings, per-side samples/s of ``read`` and ``augment``, the speedups
        ``read_speedup_vs_geotiff`` and ``speedup_vs_geotiff``; the CPU ratios
        ``read_cpu_over_raw_pread`` (the raw preads in ``raw_pread_processes`` processes, as many as the
        reader's), ``read_cpu_over_raw_pread_into_batches``, ``read_cpu_over_raw_pread_one_process``,
        ``transport_cpu_over_raw_pread``,
        ``read_stage_cpu_over_raw_pread``, ``augment_cpu_over_torch`` and
        ``dali_graph_over_torch``
        (``loader_cpu``), with
        ``cpu_ms_per_sample`` of each part and ``reader_samples_per_s_per_core``; with S3 the same from
        the object store
        (``s3_read_speedup_vs_geotiff``, ``s3_speedup_vs_geotiff`` with the shard cache,
        ``s3_nocache_*`` without it, and ours in ``s3_read_samples_per_s`` / ``s3_samples_per_s``);
        ``gpu_samples_per_s`` (None when not measured).
    """
    source, dataset, samples, repeat = cfg.source, cfg.dataset, cfg.samples, cfg.repeat
    tmp = Path(tempfile.mkdtemp(prefix="eossl-bench-loader-")) if source is None else None
    try:
        if tmp is not None:
            source, dataset = write_sample_dataset(str(tmp), cfg.patches, formats=("wds",))
        cfgs = loader_configs(cfg.workers, cfg.batch_size, cfg.seed, cfg.max_samples)
        probe = SSLLoader(dataset, cfgs["augment"], rank=0, world_size=1)
        files = geotiff_files(source, probe.catalog.key[probe.rows])
        spec = probe.views.input_spec
        mean, std = spec.normalisation(probe.manifest)
        tif_bytes = _warm_page_cache([Path(f) for pair in files for f in pair])
        _warm_page_cache(shard_paths(dataset, probe))
        os.sync()  # no writeback of freshly generated files during the timed runs
        member_bytes = sum(int(probe.catalog.size[s][probe.rows].sum()) for s in SENSORS)
        result: dict = {
            "machine": {**machine_info(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
            "source": "generated" if tmp else source,
            "dataset": "generated" if tmp else dataset,
            "samples_in_dataset": len(files),
            "settings": _settings(cfg, spec.channel_names),
            "bytes_per_sample": {
                "geotiff_s1_s2": tif_bytes // len(files),
                "shard_members_s1_s2": member_bytes // len(files),
            },
        }
        setup = Setup(cfgs, probe, (mean, std), samples, repeat)
        for stage, epochs in (("read", read_path_epochs), ("augment", loader_epochs)):
            with epochs(dataset, cfgs[stage]) as ours:
                result[stage] = setup.compare(ours, files, stage)
            del ours
            gc.collect()  # end both sides' workers before the next comparison
        result["read_speedup_vs_geotiff"] = result["read"]["speedup"]
        result["speedup_vs_geotiff"] = result["augment"]["speedup"]
        result["read_cpu_efficiency_vs_geotiff"] = result["read"]["cpu_efficiency"]
        result["cpu_efficiency_vs_geotiff"] = result["augment"]["cpu_efficiency"]
        result["goals"] = {"read_speedup_vs_geotiff": GOALS["read"], "speedup_vs_geotiff": GOALS["augment"]}

        result["read_cpu"] = read_cpu(dataset, cfgs["read"], probe, samples, repeat)
        raw = result["read_cpu"]["raw_pread"]["cpu_ms_per_sample"]
        result["read_cpu_over_raw_pread"] = result["read_cpu"]["ratio"]
        result["read_cpu_over_raw_pread_into_batches"] = result["read_cpu"]["over_raw_pread_into_batches"]
        result["read_cpu_over_raw_pread_one_process"] = result["read_cpu"]["over_raw_pread_one_process"]
        result["raw_pread_processes"] = result["read_cpu"]["processes"]
        result["transport_cpu_over_raw_pread"] = result["read_cpu"]["transport_over_raw_pread"]
        stage = result["read"]["ours"]["cpu_ms_per_sample"]
        result["read_stage_cpu_over_raw_pread"] = None if stage is None else round(stage / raw, 2)
        result["augment_cpu"] = augment_cpu(probe, 1, samples // 4 or 1, repeat)
        result["augment_cpu_over_torch"] = result["augment_cpu"]["ratio"]
        result["dali_graph_over_torch"] = result["augment_cpu"]["dali_graph_over_torch"]
        result["cpu_ms_per_sample"] = {
            "raw_pread": raw,
            "raw_pread_into_batches": result["read_cpu"]["raw_pread_into_batches"]["cpu_ms_per_sample"],
            "raw_pread_one_process": result["read_cpu"]["raw_pread_one_process"]["cpu_ms_per_sample"],
            "reader": result["read_cpu"]["reader"]["cpu_ms_per_sample"],
            "dali_transport": result["read_cpu"]["transport"]["cpu_ms_per_sample"],
            "read_stage_cpu_mode": stage,
            "augment_cpu_mode": result["augment_cpu"]["cpu_mode"]["cpu_ms_per_sample"],
            "augment_torch": result["augment_cpu"]["torch"]["cpu_ms_per_sample"],
            "augment_dali_graph": result["augment_cpu"]["dali_graph"]["cpu_ms_per_sample"],
        }
        result["reader_samples_per_s_per_core"] = round(1000 / result["cpu_ms_per_sample"]["reader"], 1)

        if cfg.local_s3:
            result.update(
                bench_local_s3(source, dataset, files, setup, cfg.s3_latency_ms, cfg.s3_bandwidth_mb_s)
            )
        else:
            result.update(bench_s3(cfg.s3_source, cfg.s3_dataset, setup))

        result["gpu_samples_per_s"] = None
        if torch.cuda.is_available():
            with loader_epochs(dataset, replace(cfgs["augment"], device="gpu")) as ours:
                gpu = single(ours, samples, repeat)
            del ours
            gc.collect()
            result["gpu"] = {"device": torch.cuda.get_device_name(0), "augment": gpu}
            result["gpu_samples_per_s"] = gpu["samples_per_s"]
        result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
