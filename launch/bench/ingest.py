"""Ingest benchmarks: encoding candidates for shard members, and ingest against bare GeoTIFF reads.

Both report ratios measured in the same run (never absolute targets in tests): the machine, its
load and its disk change absolute numbers, ratios against a baseline read on the same files do not.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio

from .bands import MODALITIES
from .config import IngestConfig
from .format import decode_member, encode_member
from .layout import scan_source
from .real_samples import REAL_PATCHES_DIR

__all__ = ["bench_encoding", "bench_ingest", "print_result"]


def machine_info() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def _rate(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Calls per second of ``fn``, repeated for at least ``min_seconds`` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return n / elapsed


def _codecs() -> dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes, np.ndarray], np.ndarray]]]:
    """name -> (encode HWC array, decode bytes given a like-array). All single-threaded."""
    import numcodecs
    from numcodecs import LZ4, Blosc, Zstd

    numcodecs.blosc.use_threads = False

    def numcodec(codec):
        return (lambda a: codec.encode(np.ascontiguousarray(a)),
                lambda b, like: np.frombuffer(codec.decode(b), dtype=like.dtype).reshape(like.shape))

    return {
        "npy (raw, chosen)": (lambda a: encode_member(np.moveaxis(a, -1, 0)), lambda b, like: decode_member(b, "HWC")),
        "lz4": numcodec(LZ4(acceleration=1)),
        "zstd-3": numcodec(Zstd(level=3)),
        "blosc-lz4+byteshuffle": numcodec(Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)),
        "blosc-zstd-3+byteshuffle": numcodec(Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)),
        "blosc-zstd-3+bitshuffle": numcodec(Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)),
    }


def bench_encoding(source: str | None = None) -> dict:
    """Bytes per sample and single-core decode MB/s of each candidate, per modality, on real patches."""
    listing = scan_source(str(source or REAL_PATCHES_DIR))
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for group in listing.groups:
        for mod, paths in group.files.items():
            with rasterio.open(paths[0]) as ds:
                arrays[mod].append(ds.read().astype(MODALITIES[mod].dtype))
    results: dict = {"machine": machine_info(), "source": str(source or "eossl real sample patches"), "modalities": {}}
    for mod, chws in arrays.items():
        if not chws:
            continue
        hwcs = [np.ascontiguousarray(np.moveaxis(a, 0, -1)) for a in chws]
        raw = sum(a.nbytes for a in hwcs)
        rows = {}
        for name, (enc, dec) in _codecs().items():
            blobs = [enc(a) for a in hwcs]
            for blob, a in zip(blobs, hwcs, strict=True):
                if not np.array_equal(dec(blob, a).view(np.uint8), a.view(np.uint8)):
                    raise AssertionError(f"{name} is not lossless on {mod}")
            per_sec = _rate(lambda blobs=blobs, dec=dec, hwcs=hwcs: [dec(b, a) for b, a in zip(blobs, hwcs, strict=True)])
            rows[name] = {
                "bytes_per_sample": int(sum(len(b) for b in blobs) / len(blobs)),
                "ratio": round(sum(len(b) for b in blobs) / raw, 3),
                "decode_MBps_per_core": round(per_sec * raw / 1e6, 1),
            }
        results["modalities"][mod] = {"raw_bytes_per_sample": raw // len(hwcs), "patches": len(hwcs), "codecs": rows}
    return results


def _bare_read(files: list[Path]) -> int:
    total = 0
    for f in files:
        with rasterio.open(f) as ds:
            total += ds.read().nbytes
    return total


def bench_ingest(source: str | None = None, patches: int = 48, workers: int = 1, repeat: int = 3) -> dict:
    """Ingest throughput against reading the same GeoTIFFs with rasterio, in one run, same page cache."""
    from .writer import run_ingest

    tmp = Path(tempfile.mkdtemp(prefix="eossl-bench-"))
    try:
        if source is None:
            from .sample_data import write_sample_data

            source = str(tmp / "src")
            write_sample_data(source, patches, seed=0)
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
        results = {"machine": machine_info(), "patches": len(groups), "files": len(files), "geotiff_bytes": tif_bytes,
                   "workers": workers, "repeat": repeat, "statistic": "median",
                   "bare_rasterio": {"seconds": round(bare_s, 3), "MBps": round(raw_bytes / bare_s / 1e6, 1)}}
        for formats in (("wds",), ("wds", "zarr")):
            times = []
            for r in range(repeat):
                out = tmp / f"ds-{'-'.join(formats)}-{r}"
                cfg = IngestConfig(source=source, dataset=str(out), formats=formats, workers=workers,
                                   progress=False, split=_no_budgets())
                t0 = time.perf_counter()
                summary = run_ingest(cfg)
                times.append(time.perf_counter() - t0)
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
                "shard_bytes_per_sample": int(shard_bytes / n),
                "zarr_bytes_per_sample": int(zarr_bytes / n) if zarr_bytes else None,
                "geotiff_bytes_per_sample": int(tif_bytes / n),
            }
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _no_budgets():
    from .config import SplitOptions

    return SplitOptions(budgets=())


def print_result(result: dict, as_json: bool) -> None:
    print(json.dumps(result) if as_json else json.dumps(result, indent=1))
