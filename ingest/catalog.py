"""The sample catalog (``catalog.npz``): where every sample's members lie in the shards, plus the
per-sample facts a loader filters on (availability, split, labels), in dataset order.

Streaming plans epochs over sample ids and reads members by byte range (``os.pread`` locally, one
ranged GET on S3), so it needs offsets without scanning tar headers, which on object storage would cost
one request per member. A plain ``.npz`` of flat arrays: ``numpy.load`` reads it with no eossl code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import crc32c_rs
import numpy as np

from .bands import MODALITY_NAMES

__all__ = ["CATALOG_MEMBERS", "Catalog", "member_crc32c"]

CATALOG_MEMBERS = ("json", *MODALITY_NAMES)


def member_crc32c(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of a member's bytes, as recorded in the catalog and checked on each read.

    CRC-32C rather than zlib's CRC-32 or a cryptographic hash: it detects every burst error up to 32 bits
    and random damage with probability 1 - 2**-32, and the CPU's carry-less multiply (x86 PCLMULQDQ /
    AVX-512 VPCLMULQDQ, ARMv8 PMULL) folds it at memory speed: ``crc32c-rs`` picks the kernel at run time,
    ~60 GB/s on bytes still in the core's cache, ~3x ``google-crc32c``'s SSE4.2 loop (docs/BENCHMARKS.md),
    and releases the GIL. ``value``: the CRC of the bytes before ``data``, so that a member read in pieces
    is checked piece by piece while each is in cache. Any buffer, no copy.
    """
    return crc32c_rs.crc32c(data, value)


@dataclass(frozen=True)
class Catalog:
    """Arrays of length N (samples in dataset order = Zarr rows = shard order).

    Attributes:
        key: sample keys.
        scene_id: scene of each sample (splits and grouping are by scene).
        shard: index into the manifest's shard list.
        offset, size: member -> (N,) int64 byte offset and size of the member's data in its tar; -1 absent.
        has: modality -> (N,) bool availability.
        train: (N,) bool, True for the training split.
        label_igbp, label_igbp_simple: (N,) int16 majority class codes (1-based, 0 = none).
        multilabel_igbp_simple: (N, 10) bool.
        crc32c: member -> (N,) int64 CRC-32C (Castagnoli, ``member_crc32c``) of the member's data; -1
            absent or unknown.
            None for a dataset written before checksums were recorded (its reads cannot be checked).
    """

    key: np.ndarray
    scene_id: np.ndarray
    shard: np.ndarray
    offset: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    has: dict[str, np.ndarray]
    train: np.ndarray
    label_igbp: np.ndarray
    label_igbp_simple: np.ndarray
    multilabel_igbp_simple: np.ndarray
    crc32c: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.key)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as a flat name -> array mapping (the ``catalog.npz`` member names)."""
        arrays = {
            "key": self.key,
            "scene_id": self.scene_id,
            "shard": self.shard,
            "train": self.train,
            "label_igbp": self.label_igbp,
            "label_igbp_simple": self.label_igbp_simple,
            "multilabel_igbp_simple": self.multilabel_igbp_simple,
        }
        for m in CATALOG_MEMBERS:
            arrays[f"offset_{m}"] = self.offset[m]
            arrays[f"size_{m}"] = self.size[m]
            if self.crc32c is not None:
                arrays[f"crc32c_{m}"] = self.crc32c[m]
        for m in MODALITY_NAMES:
            arrays[f"has_{m}"] = self.has[m]
        return arrays

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()

    def write(self, f: BinaryIO) -> None:
        """Write ``catalog.npz`` into a seekable binary file (the same bytes as ``to_bytes``)."""
        np.savez(f, **self.arrays())

    @classmethod
    def from_bytes(cls, data: bytes) -> Catalog:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                key=z["key"],
                scene_id=z["scene_id"],
                shard=z["shard"],
                train=z["train"],
                label_igbp=z["label_igbp"],
                label_igbp_simple=z["label_igbp_simple"],
                multilabel_igbp_simple=z["multilabel_igbp_simple"],
                offset={m: z[f"offset_{m}"] for m in CATALOG_MEMBERS},
                size={m: z[f"size_{m}"] for m in CATALOG_MEMBERS},
                has={m: z[f"has_{m}"] for m in MODALITY_NAMES},
                crc32c={m: z[f"crc32c_{m}"] for m in CATALOG_MEMBERS} if "crc32c_json" in z.files else None,
            )
