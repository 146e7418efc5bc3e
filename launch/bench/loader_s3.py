"""The object-store side of ``eossl bench loader``: both sides again, reading from S3.

The baseline opens ``s3://`` GeoTIFFs with rasterio (GDAL ``/vsis3/``); ours reads the shards through a
node-local shard cache (filled by the warm-up epoch) and, separately, without one (one ranged GET per
sample). ``first_epochs`` times ours alone on an empty cache, reading while shards download or not.
``bench_local_s3`` runs the same against a ``moto_server`` it starts itself.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from eossl.ingest.format import CATALOG, MANIFEST
from eossl.streaming.local_s3 import aws_environment, moto_s3_server, upload_files
from eossl.streaming.storage import StorageOptions

from .geotiff_baseline import gdal_s3_options, geotiff_files
from .latency_proxy import proxy_process
from .loader_sides import Setup, loader_epochs, read_path_epochs, shard_paths

__all__ = ["S3_BUCKET", "S3_KEYS", "bench_local_s3", "bench_s3"]

S3_BUCKET = "eossl-bench"
S3_KEYS = (
    "s3_read_speedup_vs_geotiff",
    "s3_speedup_vs_geotiff",
    "s3_nocache_read_speedup_vs_geotiff",
    "s3_nocache_speedup_vs_geotiff",
    "s3_read_samples_per_s",
    "s3_samples_per_s",
    "s3_latency_ms",
    "s3_first_epoch_read_while_downloading_speedup",
)


def bench_s3(s3_source: str | None, s3_dataset: str | None, setup: Setup) -> dict:
    """Both sides from the object store: GeoTIFFs through GDAL vs our shards with and without a node cache."""
    if s3_dataset is None:
        return dict.fromkeys(S3_KEYS)
    files = geotiff_files(s3_source, setup.probe.catalog.key[setup.probe.rows])
    gdal = gdal_s3_options()
    report: dict = {
        "source": s3_source,
        "dataset": s3_dataset,
        "endpoint_from_env": bool(os.environ.get("AWS_ENDPOINT_URL")),
        "baseline": "rasterio.open('s3://...') per GeoTIFF "
        "(GDAL /vsis3/, GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR)",
        "cache": "node-local shard cache in a temporary folder "
        "(empty at the start: filled by the warm-up epoch)",
        "no_cache": "one ranged GET per sample (its S1 and S2 members lie together in the shard), "
        f"{StorageOptions().requests_in_flight} in flight per reader process",
    }
    cache_dir = Path(tempfile.mkdtemp(prefix="eossl-bench-cache-"))
    try:
        for stage, epochs in (("read", read_path_epochs), ("augment", loader_epochs)):
            report[stage] = {}
            for variant, storage in (
                ("cache", StorageOptions(cache_dir=str(cache_dir))),
                ("no_cache", StorageOptions()),
            ):
                with epochs(s3_dataset, replace(setup.cfgs[stage], storage=storage)) as ours:
                    report[stage][variant] = setup.compare(ours, files, stage, gdal)
                del ours
                gc.collect()  # end both sides' workers before the next comparison
        report["first_epoch"] = first_epochs(s3_dataset, setup, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "s3": report,
        "s3_first_epoch_read_while_downloading_speedup": report["first_epoch"]["speedup"],
        "s3_read_speedup_vs_geotiff": report["read"]["cache"]["speedup"],
        "s3_speedup_vs_geotiff": report["augment"]["cache"]["speedup"],
        "s3_nocache_read_speedup_vs_geotiff": report["read"]["no_cache"]["speedup"],
        "s3_nocache_speedup_vs_geotiff": report["augment"]["no_cache"]["speedup"],
        "s3_read_samples_per_s": report["read"]["cache"]["ours"]["samples_per_s"],
        "s3_samples_per_s": report["augment"]["cache"]["ours"]["samples_per_s"],
        "s3_latency_ms": None,  # the store's own (a latency model applies to a local server only)
    }


def first_epochs(s3_dataset: str, setup: Setup, cache_root: Path) -> dict:
    """Samples/s of the read path's first epoch on a node whose cache is empty: reading a shard's samples
    by ranged GETs while it downloads (``read_while_downloading``) against waiting for each shard's whole
    download (the default). ``setup.repeat`` rounds, each with fresh cache folders, in alternating order;
    the reader processes are started before the clock starts (what is timed is the epoch, not start-up)."""
    rates: dict[str, list[float]] = {"read_while_downloading": [], "waiting_for_downloads": []}
    for r in range(setup.repeat):
        for name in list(rates)[:: 1 if r % 2 == 0 else -1]:
            cache = Path(tempfile.mkdtemp(prefix="first-epoch-", dir=cache_root))
            storage = StorageOptions(
                cache_dir=str(cache), read_while_downloading=name == "read_while_downloading"
            )
            try:
                with read_path_epochs(s3_dataset, replace(setup.cfgs["read"], storage=storage)) as ours:
                    t0 = time.perf_counter()
                    n = ours()
                    rates[name].append(n / (time.perf_counter() - t0))
            finally:
                gc.collect()  # end the reader processes before their cache folder goes
                shutil.rmtree(cache, ignore_errors=True)
    medians = {name: round(float(np.median(r)), 1) for name, r in rates.items()}
    return {
        "samples_per_s": medians,
        "rounds": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        "speedup": round(medians["read_while_downloading"] / medians["waiting_for_downloads"], 2),
    }


def bench_local_s3(
    source: str,
    dataset: str,
    files: list[tuple[str, str]],
    setup: Setup,
    latency_ms: float = 0.0,
    bandwidth_mb_s: float | None = None,
) -> dict:
    """``bench_s3`` against a ``moto_server`` started here (a child: its CPU counts on both sides).

    Only what the bench reads is uploaded (the benched samples' GeoTIFFs; the manifest, catalog and their
    shards), so a full-size dataset costs no more than its benched part. With ``latency_ms`` or
    ``bandwidth_mb_s`` both sides read through ``latency_proxy`` (its own process). The server's log
    folder is removed afterwards unless the run failed (the error names the log).

    moto keeps objects in memory and materialises the whole object for each ranged GET: a 2 MB range
    costs ~12 ms from a 3 MB object and ~240 ms from a 256 MB one, a cost real object stores do not have.
    The bench's generated shards are 32 MB (``write_sample_dataset``); a dataset with 256 MB shards
    makes the no-cache side look slower than it would be on S3.
    """

    logs = Path(tempfile.mkdtemp(prefix="eossl-bench-s3-"))
    with moto_s3_server(logs) as endpoint, aws_environment(endpoint):
        upload_files(source, [f for pair in files for f in pair], f"s3://{S3_BUCKET}/source")
        upload_files(
            dataset,
            [Path(dataset) / MANIFEST, Path(dataset) / CATALOG, *shard_paths(dataset, setup.probe)],
            f"s3://{S3_BUCKET}/dataset",
        )
        if latency_ms or bandwidth_mb_s:
            port = int(endpoint.rsplit(":", 1)[1].rstrip("/"))
            with proxy_process(port, latency_ms, bandwidth_mb_s) as proxied, aws_environment(proxied):
                out = bench_s3(f"s3://{S3_BUCKET}/source", f"s3://{S3_BUCKET}/dataset", setup)
        else:
            out = bench_s3(f"s3://{S3_BUCKET}/source", f"s3://{S3_BUCKET}/dataset", setup)
    shutil.rmtree(logs, ignore_errors=True)
    out["s3"]["server"] = "moto_server on 127.0.0.1 (started by the bench; objects in memory)"
    out["s3"]["latency_model"] = {
        "latency_ms_per_request": latency_ms,
        "bandwidth_mb_s_per_connection": bandwidth_mb_s,
        "how": "a TCP proxy process in front of the server holds back the start of every request"
        if latency_ms or bandwidth_mb_s
        else "none (127.0.0.1)",
    }
    out["s3_latency_ms"] = latency_ms
    return out
