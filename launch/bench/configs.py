"""The settings of each bench, one default each: the ``eossl bench`` options and their help read them here.

Kept free of heavy imports (no torch, DALI, rasterio), so that building the command line stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from eossl.ingest.storage import url_scheme

__all__ = ["IngestBenchConfig", "LoaderBenchConfig", "TrainBenchConfig"]


@dataclass(frozen=True)
class IngestBenchConfig:
    """``eossl bench ingest``: ingest throughput against bare rasterio reads of the same GeoTIFFs.

    Attributes:
        source: SEN12MS tree; None generates ``patches`` synthetic patches.
        patches: synthetic patches when no source is given.
        workers: ingest processes.
        repeat: runs per measurement; the median is reported.
    """

    source: str | None = None
    patches: int = 48
    workers: int = 1
    repeat: int = 3


@dataclass(frozen=True)
class LoaderBenchConfig:
    """``eossl bench loader``: the streaming loader against GeoTIFFs + torch ``DataLoader``, read and augment.

    Attributes:
        source: the SEN12MS GeoTIFF tree ``dataset`` was ingested from (the baseline reads the same patches).
        dataset: an ingested eossl dataset (local folder). Both None: ``patches`` synthetic patches are
            generated and ingested into a temporary folder.
        workers: CPU worker processes on both sides (DataLoader workers; DALI reader workers and threads).
        batch_size: samples per batch on both sides.
        samples: samples per timed run (whole epochs, at least two).
        repeat: timed runs per measurement; the median is reported.
        patches: patches generated when no dataset is given.
        max_samples: bench the first N samples of the dataset (catalog order, so a few shards), None for
            all: an epoch of a full-size dataset would take hours, and every timed run is whole epochs.
        s3_source: the same GeoTIFF tree on S3 (``s3://...``; endpoint and credentials from the standard
            AWS environment, e.g. ``AWS_ENDPOINT_URL``), with ``s3_dataset``.
        s3_dataset: the same dataset on S3: both sides are also timed reading from the object store (the
            baseline through GDAL's ``/vsis3/``; ours with a node-local shard cache and without one).
        local_s3: start a local S3-compatible server (``moto_server``, test extra) on 127.0.0.1, upload
            ``source`` and ``dataset`` to it and time the S3 comparison there; stopped at the end.
        s3_latency_ms: with ``local_s3``, a proxy in front of the server delays every request's response
            by this much (a real object store answers a ranged GET in ~10-30 ms; 127.0.0.1 in ~1 ms).
        s3_bandwidth_mb_s: with ``local_s3``, the proxy's bound on each connection's response rate in MB/s;
            None: unbounded.
        seed: plan and augmentation seed.
    """

    source: str | None = None
    dataset: str | None = None
    workers: int = 2
    batch_size: int = 32
    samples: int = 512
    repeat: int = 3
    patches: int = 64
    max_samples: int | None = 256
    s3_source: str | None = None
    s3_dataset: str | None = None
    local_s3: bool = False
    s3_latency_ms: float = 0.0
    s3_bandwidth_mb_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.source is None) != (self.dataset is None):
            raise ValueError("give both source (the GeoTIFF tree) and dataset (its ingest), or neither")
        if self.dataset is not None and url_scheme(self.dataset) is not None:
            raise ValueError(f"dataset must be a local folder (pass s3_dataset for S3), got {self.dataset!r}")
        if (self.s3_source is None) != (self.s3_dataset is None):
            raise ValueError(
                "give both s3_source (the GeoTIFF tree on S3) and s3_dataset (its ingest on S3), or neither"
            )
        if self.local_s3 and self.s3_dataset is not None:
            raise ValueError(
                "local_s3 uploads source and dataset to a local server: do not also give s3_source/s3_dataset"
            )
        if (self.s3_latency_ms or self.s3_bandwidth_mb_s) and not self.local_s3:
            raise ValueError("s3_latency_ms and s3_bandwidth_mb_s model a local server: give local_s3 too")
        if self.s3_latency_ms < 0 or (self.s3_bandwidth_mb_s is not None and self.s3_bandwidth_mb_s <= 0):
            raise ValueError("need s3_latency_ms >= 0 and s3_bandwidth_mb_s > 0")
        if (
            self.workers < 0
            or self.batch_size < 1
            or self.samples < 1
            or self.repeat < 1
            or (self.max_samples is not None and self.max_samples < 1)
        ):
            raise ValueError(
                "need workers >= 0, batch_size >= 1, samples >= 1, repeat >= 1, max_samples >= 1"
            )


@dataclass(frozen=True)
class TrainBenchConfig:
    """``eossl bench train``: the training loop fed by the loader against synthetic on-device batches.

    Attributes:
        data: dataset; None generates a synthetic ``patches``-patch dataset in a temporary folder.
        method: ``moco`` or ``dino``.
        steps: optimiser steps per side (the first 20 % are warm-up, not measured).
        patches: synthetic patches when no dataset is given.
    """

    data: str | None = None
    method: str = "moco"
    steps: int = 30
    patches: int = 64
