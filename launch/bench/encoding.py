"""``eossl bench encoding``: bytes per sample and single-core decode MB/s of shard encoding candidates.

Measured on real patches (the ones shipped with eossl by default): the choice of raw ``.npy`` members in
docs/FORMAT.md rests on these numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import rasterio

from eossl.ingest.bands import MODALITIES
from eossl.ingest.format import decode_member, encode_member
from eossl.ingest.layout import scan_source
from eossl.ingest.real_samples import REAL_PATCHES_DIR

from .harness import calls_per_second, machine_info

__all__ = ["bench_encoding"]

Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes, np.ndarray], np.ndarray]]


def _codecs() -> dict[str, Codec]:
    """name -> (encode HWC array, decode bytes given a like-array). All single-threaded."""
    import numcodecs
    from numcodecs import LZ4, Blosc, Zstd

    numcodecs.blosc.use_threads = False

    def numcodec(codec):
        return (
            lambda a: codec.encode(np.ascontiguousarray(a)),
            lambda b, like: np.frombuffer(codec.decode(b), dtype=like.dtype).reshape(like.shape),
        )

    return {
        "npy (raw, chosen)": (
            lambda a: encode_member(np.moveaxis(a, -1, 0)),
            lambda b, like: decode_member(b, "HWC"),
        ),
        "lz4": numcodec(LZ4(acceleration=1)),
        "zstd-3": numcodec(Zstd(level=3)),
        "blosc-lz4+byteshuffle": numcodec(Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)),
        "blosc-zstd-3+byteshuffle": numcodec(Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)),
        "blosc-zstd-3+bitshuffle": numcodec(Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)),
    }


def _codec_rows(hwcs: list[np.ndarray], modality: str) -> dict:
    """Per codec: mean bytes per sample, ratio to raw, decode MB/s on one core (lossless is checked)."""
    raw = sum(a.nbytes for a in hwcs)
    rows = {}
    for name, (enc, dec) in _codecs().items():
        blobs = [enc(a) for a in hwcs]
        for blob, a in zip(blobs, hwcs, strict=True):
            if not np.array_equal(dec(blob, a).view(np.uint8), a.view(np.uint8)):
                raise AssertionError(f"{name} is not lossless on {modality}")
        per_sec = calls_per_second(
            lambda blobs=blobs, dec=dec: [dec(b, a) for b, a in zip(blobs, hwcs, strict=True)]
        )
        rows[name] = {
            "bytes_per_sample": int(sum(len(b) for b in blobs) / len(blobs)),
            "ratio": round(sum(len(b) for b in blobs) / raw, 3),
            "decode_MBps_per_core": round(per_sec * raw / 1e6, 1),
        }
    return rows


def bench_encoding(source: str | None = None) -> dict:
    """Bytes per sample and single-core decode MB/s of each candidate, per modality, on real patches."""
    listing = scan_source(str(source or REAL_PATCHES_DIR))
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for group in listing.groups:
        for mod, paths in group.files.items():
            with rasterio.open(paths[0]) as ds:
                arrays[mod].append(ds.read().astype(MODALITIES[mod].dtype))
    results: dict = {
        "machine": machine_info(),
        "source": str(source or "eossl real sample patches"),
        "modalities": {},
    }
    for mod, chws in arrays.items():
        if not chws:
            continue
        hwcs = [np.ascontiguousarray(np.moveaxis(a, 0, -1)) for a in chws]
        results["modalities"][mod] = {
            "raw_bytes_per_sample": sum(a.nbytes for a in hwcs) // len(hwcs),
            "patches": len(hwcs),
            "codecs": _codec_rows(hwcs, mod),
        }
    return results
