"""Build the Zarr v3 random-access store from the committed tar shards.

The Zarr rows are the written samples in shard order, dense: a rejected patch leaves no hole, so
``data.zarr/s2[i]`` is always a real sample and ``key[i]`` names it. Because rejects are only known
after reading, the store is filled from the finished shards (a re-read of raw ``.npy`` members, cheap
next to GeoTIFF decoding; only each member's own bytes, at the offsets the unit records hold, so no
shard is read twice) one Zarr shard at a time: each Zarr shard has exactly one writer (concurrent
writers corrupt a shard), and a marker per block makes the step resumable.
"""

from __future__ import annotations

import errno
import tarfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES, MODALITIES, PATCH_SIZE
from .format import FORMAT_NAME, FORMAT_VERSION, PROGRESS_DIR, ZARR_DIR, decode_member
from .sample_table import SampleTable
from .storage import DatasetRoot
from .writer import IngestError

__all__ = ["build_zarr", "iter_shard_samples"]

# zstd + bitshuffle halves S2 and shrinks S1 by a quarter (measured, docs/FORMAT.md); Zarr serves
# random access for evaluation, where size on disk matters more than decode speed.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def iter_shard_samples(out: DatasetRoot, shard_path: str):
    """Yield (key, {member_ext: bytes}) for every sample of a tar shard, in order."""
    with (
        (
            open(out.path(shard_path), "rb")
            if out.is_local
            else out.fs.open(f"{out.root}/{shard_path}", "rb")
        ) as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        key, members = None, {}
        for info in tar:
            k, ext = info.name.split(".", 1)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
        if key is not None:
            yield key, members


def _block_marker(block: int) -> str:
    return f"{PROGRESS_DIR}/zarr-block-{block:06d}.done"


def _read_ranges(out: DatasetRoot, shard_path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, size) range of one shard, read in offset order from one open file."""
    opener = (
        open(out.path(shard_path), "rb") if out.is_local else out.fs.open(f"{out.root}/{shard_path}", "rb")
    )
    got: dict[int, bytes] = {}
    with opener as f:
        for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
            f.seek(ranges[i][0])
            got[i] = f.read(ranges[i][1])
    return [got[i] for i in range(len(ranges))]


def _write_block(
    out_url: str, block: int, rows: tuple[int, int], reads: list[tuple[str, list[tuple[int, str, int, int]]]]
) -> int:
    """Fill rows [start, stop) of every data array from the members that hold them.

    Only the members' own bytes are read (their offsets come from the unit records), so a shard that
    spans several blocks is not read again per block: each member is read once in the whole build.

    Args:
        reads: (shard_path, [(row, modality, offset, size), ...]) per shard holding some of the rows.
    """
    out = DatasetRoot(out_url)
    group = zarr.open_group(out.zarr_store(ZARR_DIR), mode="r+")
    start, stop = rows
    blocks = {
        m: np.full((stop - start, *MODALITIES[m].shape_chw), MODALITIES[m].fill, dtype=MODALITIES[m].dtype)
        for m in MODALITIES
    }
    for shard_path, members in reads:
        datas = _read_ranges(out, shard_path, [(off, size) for _row, _mod, off, size in members])
        for (row, mod, off, size), data in zip(members, datas, strict=True):
            if len(data) != size:
                raise IngestError(
                    f"{out.path(shard_path)}: {size} bytes expected at offset {off}, {len(data)} read "
                    "(the shard is shorter than its unit record says)"
                )
            blocks[mod][row - start] = decode_member(data, "CHW")
    for mod, data in blocks.items():
        group[mod][start:stop] = data
    out.write_bytes(_block_marker(block), b"")
    return stop - start


def _create(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...], **attrs) -> None:
    # Text goes in as Zarr v3's variable-length UTF-8 (numpy '<U' would be an unspecified fixed-width type).
    dtype = str if data.dtype.kind == "U" else data.dtype
    arr = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=dims, overwrite=True)
    arr[...] = data
    arr.attrs.update(attrs)


def write_metadata_arrays(group: zarr.Group, table: SampleTable, extra: dict[str, np.ndarray]) -> None:
    """Per-sample metadata as plain arrays (readable by zarr/xarray without eossl)."""
    for field in ("key", "scene_id", "roi", "season", "crs", "split"):
        _create(group, field, table.text[field], ("sample",))
    _create(group, "scene", table.scene, ("sample",))
    _create(group, "patch", table.patch, ("sample",))
    _create(
        group,
        "transform",
        table.transform,
        ("sample", "coef"),
        description="affine a, b, c, d, e, f (rasterio order) of each patch",
    )
    for mod in MODALITIES:
        _create(
            group,
            f"has_{mod}",
            table.has[mod],
            ("sample",),
            description=f"True where the patch has {mod}; elsewhere {mod} holds its fill value",
        )
    for mod in MODALITIES:
        _create(
            group,
            f"{mod}_invalid_pixels",
            table.invalid[mod],
            ("sample",),
            description=f"invalid pixels kept as stored in {mod} (below the reject threshold; outside the "
            "physical range, non-finite, nodata or not in the legend)",
        )
    for scheme, classes in (("igbp", IGBP_CLASSES), ("igbp_simple", IGBP_SIMPLE_CLASSES)):
        names = list(classes)
        _create(
            group,
            f"label_{scheme}",
            table.label[scheme],
            ("sample",),
            classes=names,
            description="majority class code, 1-based; 0 = no land cover",
        )
        _create(
            group,
            f"multilabel_{scheme}",
            table.multi[scheme],
            ("sample", scheme),
            classes=names,
            description="classes covering at least the multi-label threshold of the patch",
        )
        _create(group, f"fractions_{scheme}", table.fractions[scheme], ("sample", scheme), classes=names)
    for name, values in extra.items():
        _create(group, name, values, ("sample",) if values.ndim == 1 else ("sample", "index"))


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` in an exception's chain (zarr and process pools wrap the failed write)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def build_zarr(
    out: DatasetRoot,
    shards: list[dict],
    table: SampleTable,
    extra: dict[str, np.ndarray],
    shard_samples: int,
    workers: int,
    attrs: dict,
) -> None:
    """Create (or resume) ``data.zarr`` with data arrays filled from ``shards`` and metadata arrays.

    ``table`` holds every sample's metadata and where its members lie in its shard.

    Raises:
        IngestError: a write failed (a full disk above all): names the store and the reason. Blocks already
            written are kept (their markers), so the same command finishes the store once there is space.
    """
    try:
        _build_zarr(out, shards, table, extra, shard_samples, workers, attrs)
    except Exception as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "disk full (no space left on the device)" if full else f"{type(cause).__name__}: {cause}"
        raise IngestError(
            f"{out.path(ZARR_DIR)}: writing the Zarr store failed: {reason}; blocks already written are "
            "kept: free space, then run the same command again to finish it"
        ) from exc


def _build_zarr(
    out: DatasetRoot,
    shards: list[dict],
    table: SampleTable,
    extra: dict[str, np.ndarray],
    shard_samples: int,
    workers: int,
    attrs: dict,
) -> None:
    n = len(table)
    store = out.zarr_store(ZARR_DIR)
    group = zarr.open_group(store, mode="a", zarr_format=3)
    for mod, m in MODALITIES.items():
        existing = group.get(mod)
        if existing is not None and existing.shape == (n, *m.shape_chw):
            continue
        group.create_array(
            mod,
            shape=(n, *m.shape_chw),
            dtype=m.dtype,
            chunks=(1, *m.shape_chw),
            shards=(shard_samples, *m.shape_chw),
            compressors=_COMPRESSOR,
            fill_value=m.fill,
            dimension_names=("sample", f"{mod}_band", "y", "x"),
            overwrite=True,
        ).attrs.update({"bands": list(m.bands), "unit": m.unit, "layout": "CHW"})
    write_metadata_arrays(group, table, extra)
    group.attrs.update(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "patch_size": PATCH_SIZE, **attrs}
    )

    jobs = []
    for block, start in enumerate(range(0, n, shard_samples)):
        stop = min(start + shard_samples, n)
        if out.exists(_block_marker(block)):
            continue
        reads: dict[int, list[tuple[int, str, int, int]]] = {}
        for row in range(start, stop):
            for mod in MODALITIES:
                offset, size = int(table.offset[mod][row]), int(table.size[mod][row])
                if offset >= 0:
                    reads.setdefault(int(table.shard[row]), []).append((row, mod, offset, size))
        jobs.append((out.url, block, (start, stop), [(shards[i]["path"], r) for i, r in reads.items()]))
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _write_block(*job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for fut in [pool.submit(_write_block, *job) for job in jobs]:
            fut.result()
