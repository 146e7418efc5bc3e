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
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES
from .format import FORMAT_NAME, FORMAT_VERSION, PROGRESS_DIR, ZARR_DIR, decode_member
from .sample_columns import SampleColumns
from .source import SEN12MS_SOURCE, Source
from .sources import get_source
from .storage import DatasetRoot
from .writer import IngestError

__all__ = [
    "COORDINATES",
    "build_zarr",
    "consolidate",
    "coordinate_names",
    "iter_shard_samples",
    "write_coordinates",
]


# Coordinate arrays: an array named after its dimension is that dimension's index in xarray, so
# ``xr.open_zarr(path).s2.sel(s2_band="B4")`` and ``.sel(sample=KEY)`` select by name with no eossl code.
def coordinate_names(source: Source = SEN12MS_SOURCE) -> tuple[str, ...]:
    """The coordinate arrays of a dataset of ``source``: sample keys, band names per modality, class
    names per label scheme and the affine coefficients' names."""
    return ("sample", *(f"{m}_band" for m in source.modalities), *source.label_schemes, "coef")


COORDINATES = coordinate_names()  # a SEN12MS dataset's

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
    out_url: str,
    block: int,
    rows: tuple[int, int],
    reads: list[tuple[str, list[tuple[int, str, int, int]]]],
    source_format: str = "sen12ms",
) -> int:
    """Fill rows [start, stop) of every data array from the members that hold them.

    Only the members' own bytes are read (their offsets come from the unit records), so a shard that
    spans several blocks is not read again per block: each member is read once in the whole build.

    Args:
        reads: (shard_path, [(row, modality, offset, size), ...]) per shard holding some of the rows.
        source_format: the source collection, whose band tables give the arrays' shapes and fills.
    """
    out = DatasetRoot(out_url)
    group = zarr.open_group(out.zarr_store(ZARR_DIR), mode="r+", use_consolidated=False)
    start, stop = rows
    tables = get_source(source_format).modalities
    blocks = {m: np.full((stop - start, *t.shape_chw), t.fill, dtype=t.dtype) for m, t in tables.items()}
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


def _block_jobs(
    out: DatasetRoot,
    shards: list[dict],
    columns: SampleColumns,
    shard_samples: int,
    source: Source,
) -> Iterator[tuple]:
    """The ``_write_block`` arguments of each Zarr block not yet written, one block at a time."""
    n = columns.n
    for block, start in enumerate(range(0, n, shard_samples)):
        stop = min(start + shard_samples, n)
        if out.exists(_block_marker(block)):
            continue
        reads: dict[int, list[tuple[int, str, int, int]]] = {}
        for row in range(start, stop):
            for mod in source.modalities:
                off = int(columns.offset[mod][row])
                if off >= 0:
                    reads.setdefault(int(columns.shard[row]), []).append(
                        (row, mod, off, int(columns.size[mod][row]))
                    )
        yield (out.url, block, (start, stop), [(shards[i]["path"], r) for i, r in reads.items()], source.name)


def _create(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...], **attrs) -> None:
    # Text goes in as Zarr v3's variable-length UTF-8 (numpy '<U' would be an unspecified fixed-width type).
    dtype = str if data.dtype.kind == "U" else data.dtype
    arr = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=dims, overwrite=True)
    arr[...] = data
    arr.attrs.update(attrs)


def write_metadata_arrays(
    group: zarr.Group, columns: SampleColumns, extra: dict[str, np.ndarray], source: Source = SEN12MS_SOURCE
) -> None:
    """Per-sample metadata as plain arrays (readable by zarr/xarray without eossl)."""
    id_text = [f for f, kind in source.id_fields.items() if kind == "str"]
    for field in ("key", "scene_id", *id_text, "crs", "split"):
        _create(group, field, columns.strings(field), ("sample",))
    for field, values in columns.ints.items():
        _create(group, field, values, ("sample",))
    _create(
        group,
        "transform",
        columns.transform,
        ("sample", "coef"),
        description="affine a, b, c, d, e, f (rasterio order) of each patch",
    )
    for mod in source.modalities:
        _create(
            group,
            f"has_{mod}",
            columns.has[mod],
            ("sample",),
            description=f"True where the patch has {mod}; elsewhere {mod} holds its fill value",
        )
    for mod in source.modalities:
        _create(
            group,
            f"{mod}_invalid_pixels",
            columns.invalid[mod],
            ("sample",),
            description=f"invalid pixels kept as stored in {mod} (below the reject threshold; outside the "
            "physical range, non-finite, nodata or not in the legend)",
        )
    if source.name != "sen12ms":
        _write_multilabels(group, columns, source)
    for scheme, classes in (("igbp", IGBP_CLASSES), ("igbp_simple", IGBP_SIMPLE_CLASSES)):
        if source.name != "sen12ms":
            break
        names = list(classes)
        _create(
            group,
            f"label_{scheme}",
            columns.single[scheme],
            ("sample",),
            classes=names,
            description="majority class code, 1-based; 0 = no land cover",
        )
        _create(
            group,
            f"multilabel_{scheme}",
            columns.multi[scheme],
            ("sample", scheme),
            classes=names,
            description="classes covering at least the multi-label threshold of the patch",
        )
        _create(group, f"fractions_{scheme}", columns.fractions[scheme], ("sample", scheme), classes=names)
    for name, values in extra.items():
        _create(group, name, values, ("sample",) if values.ndim == 1 else ("sample", "index"))


def write_coordinates(group: zarr.Group, keys: np.ndarray, source: Source) -> None:
    """The coordinate arrays (``coordinate_names(source)``): sample keys, band names, the class names of the
    multi-label and fraction arrays' second dimension and the names of the affine coefficients."""
    _create(group, "sample", keys, ("sample",), description="sample key (the same as `key`)")
    for mod, m in source.modalities.items():
        _create(group, f"{mod}_band", np.array(m.bands, dtype=str), (f"{mod}_band",))
    for scheme, classes in source.label_schemes.items():
        _create(group, scheme, np.array(list(classes), dtype=str), (scheme,))
    _create(group, "coef", np.array(list("abcdef"), dtype=str), ("coef",), description="affine coefficient")


def consolidate(store) -> None:
    """Write the group's consolidated metadata (every array's metadata in the root ``zarr.json``).

    One read opens the whole store instead of one per array (dozens of GETs on object storage), and
    ``xarray.open_zarr`` opens it without its warning about missing consolidated metadata. Written last,
    after every array and attribute, so it never lags the arrays it describes.
    """
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not yet part of the Zarr v3 specification; zarr and
        # xarray read it, and a reader that ignores it reads the arrays' own metadata.
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(store)


def _write_multilabels(group: zarr.Group, columns: SampleColumns, source: Source) -> None:
    """``multilabel_<scheme>`` (N, classes) bool for a multi-label source, and ``label_<scheme>`` (N,):
    the lowest class code of each sample (0: no class), which is what label budgets stratify by and
    what marks a sample as labelled; there is no majority class."""
    for scheme, classes in source.label_schemes.items():
        multi = columns.multi[scheme]
        lowest = np.where(multi.any(axis=1), multi.argmax(axis=1) + 1, 0).astype(np.int16)
        _create(
            group,
            f"label_{scheme}",
            lowest,
            ("sample",),
            classes=list(classes),
            description="lowest class code of the sample's labels, 1-based; 0 = no class (multi-label "
            f"source: the labels are multilabel_{scheme})",
        )
        _create(
            group,
            f"multilabel_{scheme}",
            multi,
            ("sample", scheme),
            classes=list(classes),
            description="the sample's classes (multi-label, from the source's label metadata)",
        )


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
    columns: SampleColumns,
    extra: dict[str, np.ndarray],
    shard_samples: int,
    workers: int,
    attrs: dict,
    source: Source = SEN12MS_SOURCE,
) -> None:
    """Create (or resume) ``data.zarr`` with data arrays filled from ``shards`` and metadata arrays.

    ``columns`` holds every sample's facts in dataset order, with each member's offset and size in its
    shard (from the unit records).

    Raises:
        IngestError: a write failed (a full disk above all): names the store and the reason. Blocks already
            written are kept (their markers), so the same command finishes the store once there is space.
    """
    try:
        _build_zarr(out, shards, columns, extra, shard_samples, workers, attrs, source)
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
    columns: SampleColumns,
    extra: dict[str, np.ndarray],
    shard_samples: int,
    workers: int,
    attrs: dict,
    source: Source,
) -> None:
    n = columns.n
    store = out.zarr_store(ZARR_DIR)
    # Not through consolidated metadata: a resumed build re-creates arrays, which would make it stale.
    group = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    for mod, m in source.modalities.items():
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
    write_metadata_arrays(group, columns, extra, source)
    write_coordinates(group, columns.strings("key"), source)
    head = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "patch_size": source.patch_size}
    if source.name != "sen12ms":
        head["source_format"] = source.name
    group.attrs.update({**head, **attrs})

    in_shards = sum(s["samples"] for s in shards)
    if in_shards != n:
        raise IngestError(f"{out.path(ZARR_DIR)}: {n} samples but {in_shards} in the shards")
    jobs = _block_jobs(out, shards, columns, shard_samples, source)
    if workers <= 1:
        for job in jobs:
            _write_block(*job)
    else:
        # A few blocks in flight per worker: a block's job (its members' offsets) is made when it is sent.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            pending: list = []
            for job in jobs:
                pending.append(pool.submit(_write_block, *job))
                if len(pending) >= 2 * workers:
                    pending.pop(0).result()
            for fut in pending:
                fut.result()
    consolidate(store)
