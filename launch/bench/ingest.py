"""``eossl bench ingest``: ingest throughput against reading the same GeoTIFFs with rasterio.

Both sides run in one process on the same files from the same (warm) page cache, so the ratio
``ratio_vs_bare_read`` says how much of a bare read's speed the ingest keeps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from eossl.ingest.config import IngestConfig, SplitOptions
from eossl.ingest.layout import scan_source

from .configs import IngestBenchConfig
from .harness import machine_info

__all__ = ["bench_ingest"]


def _bare_read(files: list[Path]) -> int:
    total = 0
    for f in files:
        with rasterio.open(f) as ds:
            total += ds.read().nbytes
    return total


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (ingest workers), user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_ingest(cfg: IngestBenchConfig) -> dict:
    """Ingest throughput against reading the same GeoTIFFs with rasterio, in one run, same page cache."""
    from eossl.ingest.writer import run_ingest

    source, repeat = cfg.source, cfg.repeat
    tmp = Path(tempfile.mkdtemp(prefix="eossl-bench-"))
    try:
        if source is None:
            from eossl.ingest.sample_data import write_sample_data

            source = str(tmp / "src")
            write_sample_data(source, cfg.patches, seed=0)
        groups = scan_source(source).groups
        files = [Path(p) for g in groups for ps in g.files.values() for p in ps]
        tif_bytes = sum(f.stat().st_size for f in files)
        _bare_read(files)  # warm the page cache for both sides
        bare_times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            raw_bytes = _bare_read(files)
            bare_times.append(time.perf_counter() - t0)
        bare_s = float(np.median(bare_times))
        results = {
            "machine": machine_info(),
            "patches": len(groups),
            "files": len(files),
            "geotiff_bytes": tif_bytes,
            "workers": cfg.workers,
            "repeat": repeat,
            "statistic": "median",
            "bare_rasterio": {"seconds": round(bare_s, 3), "MBps": round(raw_bytes / bare_s / 1e6, 1)},
        }
        for formats in (("wds",), ("wds", "zarr")):
            times, cpu = [], []
            for r in range(repeat):
                out = tmp / f"ds-{'-'.join(formats)}-{r}"
                ingest = IngestConfig(
                    source=source,
                    dataset=str(out),
                    formats=formats,
                    workers=cfg.workers,
                    progress=False,
                    split=SplitOptions(budgets=()),
                )
                t0, c0 = time.perf_counter(), _cpu_s()
                summary = run_ingest(ingest)
                times.append(time.perf_counter() - t0)
                cpu.append(_cpu_s() - c0)
                shard_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))
                zarr_bytes = sum(p.stat().st_size for p in (out / "data.zarr").rglob("*") if p.is_file())
                shutil.rmtree(out)
            secs = float(np.median(times))
            n = max(summary.written, 1)
            results["ingest_" + "+".join(formats)] = {
                "seconds": round(secs, 3),
                "patches_per_s": round(summary.found / secs, 1),
                "MBps": round(raw_bytes / secs / 1e6, 1),
                "ratio_vs_bare_read": round(bare_s / secs, 3),
                # per patch: flat from 128 to 2,048 patches when nothing grows with the dataset
                "ms_per_patch": round(secs / max(summary.found, 1) * 1e3, 2),
                "cpu_ms_per_patch": round(float(np.median(cpu)) / max(summary.found, 1) * 1e3, 2),
                "shard_bytes_per_sample": int(shard_bytes / n),
                "zarr_bytes_per_sample": int(zarr_bytes / n) if zarr_bytes else None,
                "geotiff_bytes_per_sample": int(tif_bytes / n),
            }
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
