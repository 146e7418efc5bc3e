"""The eossl dataset format: names, layout and the per-modality encoding (spec: docs/FORMAT.md).

This module is the contract between the writer (ingest) and every reader (streaming, eval, users with
plain ``tarfile`` / ``webdataset`` / ``zarr``). Readers import names from here, never re-spell them.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = [
    "CATALOG",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "PROGRESS_DIR",
    "READ_VERSIONS",
    "REJECTS",
    "SHARD_DIR",
    "SUBSETS",
    "WDS_LAYOUT",
    "ZARR_DIR",
    "UnsupportedFormatError",
    "check_format",
    "decode_member",
    "encode_member",
    "member_name",
    "npy_view",
    "shard_name",
]

FORMAT_NAME = "eossl-sen12ms"
# Additions a version-1 reader does not need (the Zarr coordinate arrays and consolidated metadata, the
# DALI index files beside the shards) keep the version: datasets written with and without them read alike.
# A change to bytes a reader interprets (encoding, layout, catalog fields it relies on) is a new version.
FORMAT_VERSION = 1
# Versions this code reads. A reader refuses any other: a dataset written by a newer eossl may lay out its
# bytes differently, and reading it as this version would train on wrong data without an error.
READ_VERSIONS = (1,)

MANIFEST = "manifest.json"
CATALOG = "catalog.npz"
REJECTS = "rejects.jsonl"
SUBSETS = "subsets.json"
SHARD_DIR = "shards"
ZARR_DIR = "data.zarr"
PROGRESS_DIR = "_progress"  # unit records of an unfinished ingest (resume, merge); deleted once final

# Arrays in the tar shards are stored channels-last (H, W, C): DALI's image operators work on HWC and a
# transpose in the input pipeline costs ~3x (docs/FORMAT.md). The Zarr store keeps SEN12MS's (C, H, W).
WDS_LAYOUT = "HWC"


class UnsupportedFormatError(ValueError):
    """A dataset file of another format or of a format version this code does not read."""


def check_format(where: str, version: object, name: object = FORMAT_NAME) -> None:
    """Refuse a manifest, shard sample or Zarr store that is not ``FORMAT_NAME`` at a version in
    ``READ_VERSIONS``; ``where`` names the file in the message (a shard sample records only its version).

    Raises:
        UnsupportedFormatError: naming the file, what it says, and the versions this code reads.
    """
    if name != FORMAT_NAME:
        raise UnsupportedFormatError(f"{where}: format {name!r}, expected {FORMAT_NAME!r}")
    if version not in READ_VERSIONS:
        readable = ", ".join(str(v) for v in READ_VERSIONS)
        raise UnsupportedFormatError(
            f"{where}: {FORMAT_NAME} format_version {version!r}, but this eossl reads version "
            f"{readable} only; use the eossl that wrote it, or re-ingest with this one"
        )


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.tar"


def member_name(modality: str) -> str:
    """Tar member extension of a modality: ``<key>.s1.npy``; the JSON metadata member is ``<key>.json``."""
    return f"{modality}.npy"


def encode_member(chw: np.ndarray) -> bytes:
    """Lossless encoding of one modality: an uncompressed ``.npy`` of the HWC array.

    ``.npy`` was chosen by measurement (docs/FORMAT.md): decoding is a header parse plus a memcpy on CPU,
    DALI decodes it natively (``fn.decoders.numpy``) and ``webdataset``/``numpy`` read it with no eossl code.
    """
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.moveaxis(chw, 0, -1)), allow_pickle=False)
    return buf.getvalue()


def npy_view(data: bytes | memoryview) -> np.ndarray:
    """Zero-copy array over an ``.npy`` member's bytes (header parse + ``np.frombuffer``)."""
    view = memoryview(data)
    if len(view) < 12 or bytes(view[:6]) != b"\x93NUMPY":
        raise ValueError("not an .npy member (bad magic)")
    start = 10 if view[6] == 1 else 12
    header_len = int.from_bytes(view[8:start], "little")
    f = io.BytesIO(bytes(view[: start + header_len]))  # only the header is copied
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or dtype.hasobject:
        raise ValueError("unexpected .npy member: Fortran order or object dtype")
    count = int(np.prod(shape))
    if f.tell() + count * dtype.itemsize != len(data):
        raise ValueError(f".npy member is {len(data)} bytes, header says {f.tell() + count * dtype.itemsize}")
    return np.frombuffer(view, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


def decode_member(data: bytes, layout: str = "CHW") -> np.ndarray:
    """Decode a member written by :func:`encode_member`; ``layout="CHW"`` restores the GeoTIFF order."""
    hwc = npy_view(data)
    if layout == "HWC":
        return hwc
    if layout == "CHW":
        return np.moveaxis(hwc, -1, 0)
    raise ValueError(f"layout must be 'HWC' or 'CHW', got {layout!r}")
