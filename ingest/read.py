"""Read one SEN12MS patch (its s1/s2/lc GeoTIFFs) into a validated :class:`Sample`, or a :class:`Reject`.

``read_patch`` is a pure function of the file paths and the options: the writer maps it over patches
in worker processes. Every way a real input can be wrong ends here as a ``Reject`` with the file and a
reason a person can act on; nothing raises past it, so one bad file never stops a 180k-patch ingest.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader

from .bands import MODALITIES, PATCH_SIZE, Modality
from .labels import PatchLabels, patch_labels
from .layout import PatchGroup
from .storage import url_scheme
from .validity import invalid_mask, invalid_reason, worst_band_fraction

__all__ = ["ReadOptions", "Reject", "Sample", "read_patch"]


@dataclass(frozen=True)
class ReadOptions:
    """What makes a patch acceptable.

    A pixel is invalid when :func:`~eossl.ingest.validity.invalid_mask` says so (non-finite, declared
    nodata, outside the modality's physical range, or an LC code outside its legend). Below the limits
    invalid pixels are kept as stored, counted in the sample metadata and left out of the statistics;
    streaming replaces non-finite S1 values and, by default, clips S1 to [-25, 0] dB.

    Attributes:
        required: modalities a patch must have to be written (others are optional).
        max_s1_invalid_fraction: reject a patch whose S1 has more invalid pixels (NaN/Inf/nodata or
            outside [-60, 40] dB) than this fraction (per band, worst band).
        max_s2_invalid_fraction: the same for S2 (0 = L1C nodata, above 20,000 incl. 65535 saturated).
        max_lc_invalid_fraction: the same for LC codes outside each layer's legend. A patch above it is
            rejected rather than written without labels: such a file is not the documented MODIS product,
            and silently unlabelled patches would shrink the labelled set without anyone noticing.
        multilabel_threshold: area fraction above which a class is a positive in multi-label targets
            (0.1 in the SEN12MS classification code).
    """

    required: tuple[str, ...] = ("s1", "s2")
    max_s1_invalid_fraction: float = 0.01
    max_s2_invalid_fraction: float = 0.01
    max_lc_invalid_fraction: float = 0.01
    multilabel_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("max_s1_invalid_fraction", "max_s2_invalid_fraction", "max_lc_invalid_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")

    def max_invalid_fraction(self, modality: str) -> float:
        return {
            "s1": self.max_s1_invalid_fraction,
            "s2": self.max_s2_invalid_fraction,
            "lc": self.max_lc_invalid_fraction,
        }[modality]


@dataclass
class Sample:
    """A validated patch: arrays in the SEN12MS band order, CHW, in eossl's stored dtypes."""

    key: str
    arrays: dict[str, np.ndarray]
    crs: str
    transform: tuple[float, ...]
    files: dict[str, str]
    invalid: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (C, H, W) bool mask
    labels: PatchLabels | None = None
    # modality -> {"crs", "transform"} of its own file, recorded for sources whose modalities need not
    # share one grid exactly (empty for SEN12MS, whose modalities must).
    grids: dict[str, dict] = field(default_factory=dict)

    def invalid_pixels(self, modality: str) -> int:
        """Invalid pixels of one modality, all bands together (0 when the patch lacks it)."""
        mask = self.invalid.get(modality)
        return int(mask.sum()) if mask is not None else 0


@dataclass
class Reject:
    """A patch that is not written, with why. ``errors`` holds one (file, reason) per problem found."""

    key: str
    reason: str
    files: dict[str, list[str]]
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"key": self.key, "reason": self.reason, "files": self.files, "errors": self.errors}


class _BadFile(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _open_bytes_or_path(path: str):
    """Local paths go straight to GDAL; URLs are fetched whole (a patch is <2 MB) through fsspec."""
    if url_scheme(path) is None:
        return path
    with fsspec.open(path, "rb") as f:
        return io.BytesIO(f.read())


def _read_checked_geotiff(
    path: str, modality: Modality, what: str, check_layout: Callable[[DatasetReader], None]
) -> tuple[np.ndarray, str, tuple[float, ...], float | None]:
    """All bands of a GeoTIFF (C, H, W) as stored, its CRS, transform and declared nodata.

    Every way the file can be wrong raises ``_BadFile`` naming it: it cannot be fetched,
    ``check_layout`` refuses its band count or shape, its dtype is not one ``modality`` accepts (said
    for ``what``: ``s2`` or ``s2 B3``), it has no CRS, or GDAL cannot read it.
    """
    try:
        src = _open_bytes_or_path(path)
    except (OSError, ValueError) as exc:
        raise _BadFile(path, f"cannot fetch file: {exc}") from exc
    try:
        with rasterio.open(src) as ds:
            check_layout(ds)
            dtypes = set(ds.dtypes)
            if len(dtypes) != 1 or next(iter(dtypes)) not in modality.accepted_dtypes:
                raise _BadFile(
                    path,
                    f"wrong dtype {'/'.join(sorted(dtypes))} for {what}, expected "
                    f"{' or '.join(modality.accepted_dtypes)}",
                )
            if ds.crs is None:
                raise _BadFile(path, "no CRS (not georeferenced)")
            return ds.read(), ds.crs.to_string(), tuple(float(v) for v in ds.transform[:6]), ds.nodata
    except _BadFile:
        raise
    except (RasterioError, OSError, ValueError) as exc:
        raise _BadFile(path, f"unreadable or truncated GeoTIFF: {exc}") from exc


def _read_geotiff(path: str, modality: Modality) -> tuple[np.ndarray, str, tuple[float, ...], float | None]:
    def check_layout(ds: DatasetReader) -> None:
        if ds.count != modality.channels:
            raise _BadFile(
                path,
                f"wrong band count {ds.count} for {modality.name}, expected {modality.channels} "
                f"({', '.join(modality.bands)})",
            )
        if (ds.height, ds.width) != (PATCH_SIZE, PATCH_SIZE):
            raise _BadFile(path, f"wrong shape {ds.height}x{ds.width}, expected {PATCH_SIZE}x{PATCH_SIZE}")

    data, crs, transform, nodata = _read_checked_geotiff(path, modality, modality.name, check_layout)
    if data.dtype != np.dtype(modality.dtype):
        if data.size and int(data.max()) > np.iinfo(modality.dtype).max:
            raise _BadFile(path, f"values up to {int(data.max())} do not fit {modality.dtype}")
        data = data.astype(modality.dtype)
    return data, crs, transform, nodata


def _same_grid(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    # Pixel size exact to 1e-9 relative, origin to a millimetre: co-registered SEN12MS files match exactly.
    return all(abs(x - y) <= 1e-3 for x, y in zip(a, b, strict=True))


def read_patch(group: PatchGroup, options: ReadOptions) -> Sample | Reject:
    """Read and validate every modality of one patch; never raises for bad data."""
    errors: list[dict[str, str]] = []

    def reject(reason: str) -> Reject:
        return Reject(key=group.key, reason=reason, files=group.files, errors=errors)

    for mod, paths in group.files.items():
        if len(paths) > 1:
            errors.append({"file": paths[1], "reason": f"duplicate {mod} file for {group.key}"})
    if errors:
        return reject(f"duplicate files for one patch: {', '.join(e['file'] for e in errors)}")
    missing = [m for m in options.required if m not in group.files]
    if missing:
        return reject(
            f"missing required modality {', '.join(missing)} "
            f"(found: {', '.join(sorted(group.files)) or 'none'})"
        )

    arrays: dict[str, np.ndarray] = {}
    grids: dict[str, tuple[str, tuple[float, ...]]] = {}
    invalid: dict[str, np.ndarray] = {}
    for mod in MODALITIES:  # fixed order: s1, s2, lc
        if mod not in group.files:
            continue
        path = group.files[mod][0]
        try:
            data, crs, transform, nodata = _read_geotiff(path, MODALITIES[mod])
        except _BadFile as bad:
            errors.append({"file": bad.path, "reason": bad.reason})
            continue
        invalid[mod] = invalid_mask(mod, data, nodata)
        fraction, limit = worst_band_fraction(invalid[mod]), options.max_invalid_fraction(mod)
        if fraction > limit:
            errors.append({"file": path, "reason": invalid_reason(mod, fraction, limit)})
            continue
        arrays[mod] = data
        grids[mod] = (crs, transform)
    if errors:
        return reject("; ".join(f"{e['file']}: {e['reason']}" for e in errors))

    ref_mod = next(iter(grids))
    ref_crs, ref_transform = grids[ref_mod]
    for mod, (crs, transform) in grids.items():
        if crs != ref_crs or not _same_grid(transform, ref_transform):
            errors.append(
                {
                    "file": group.files[mod][0],
                    "reason": (
                        f"grid mismatch: {mod} is {crs} {transform}, {ref_mod} is {ref_crs} {ref_transform}"
                    ),
                }
            )
    if errors:
        return reject("; ".join(f"{e['file']}: {e['reason']}" for e in errors))

    labels = patch_labels(arrays["lc"][0], options.multilabel_threshold) if "lc" in arrays else None
    return Sample(
        key=group.key,
        arrays=arrays,
        crs=ref_crs,
        transform=ref_transform,
        files={m: p[0] for m, p in group.files.items()},
        invalid=invalid,
        labels=labels,
    )
