"""Read a modality stored as one GeoTIFF per band, at several resolutions, onto one 10 m grid.

BigEarthNet-MM and SSL4EO-S12 store each Sentinel-2 band in its own file at its native resolution
(10 m: B2, B3, B4, B8; 20 m: B5, B6, B7, B8A, B11, B12; 60 m: B1, B9, B10). eossl stores every modality
of a sample on one grid, the finest (10 m), so that crops, flips and the sensors of a sample stay
aligned pixel for pixel.

Resampling method: **nearest neighbour by integer block replication** (each 20 m pixel becomes 2 x 2
pixels, each 60 m pixel 6 x 6). Why: the band grids of one patch share their upper-left corner and
their pixel sizes are exact multiples (BigEarthNet: 120/60/20 px, SSL4EO-S12: 264/132/44 px), so
replication puts every coarse pixel exactly over the 10 m pixels it covers, with no half-pixel shift;
it invents no value that was not measured (bilinear or cubic would create reflectances between
neighbouring pixels, mixing land and water at a coast, and would change the band statistics), nodata
stays nodata instead of bleeding into its neighbours, and it is exactly invertible (every k x k block
of the result holds one stored value). 10 m bands are copied unchanged. A band whose grid is not an
integer subdivision with the same corner and CRS is refused, naming the file: resampling it would
silently shift it against the other bands.
"""

from __future__ import annotations

import numpy as np
from rasterio.io import DatasetReader

from .bands import Modality
from .layout import PatchGroup
from .read import ReadOptions, Reject, Sample, _BadFile, _read_checked_geotiff
from .validity import invalid_mask, invalid_reason, worst_band_fraction

__all__ = ["BandRead", "assemble", "read_band", "read_modality", "upsample_nearest"]

# Corner agreement between the band grids of one patch, in CRS units (metres): a millimetre, as for
# co-registered SEN12MS files.
_CORNER_TOLERANCE = 1e-3


def upsample_nearest(band: np.ndarray, factor: int) -> np.ndarray:
    """(h, w) -> (h * factor, w * factor): each pixel repeated into a factor x factor block."""
    if factor == 1:
        return band
    return np.repeat(np.repeat(band, factor, axis=0), factor, axis=1)


class BandRead:
    """One band file read: its single band, georeference and declared nodata."""

    def __init__(self, data: np.ndarray, crs: str, transform: tuple[float, ...], nodata: float | None):
        self.data, self.crs, self.transform, self.nodata = data, crs, transform, nodata


def read_band(path: str, table: Modality, band: str) -> BandRead:
    """Read a one-band GeoTIFF, converting to the table's dtype only where lossless.

    Raises:
        _BadFile: unreadable, not one band, wrong dtype, not georeferenced, or values that do not fit.
    """

    def check_layout(ds: DatasetReader) -> None:
        if ds.count != 1:
            raise _BadFile(path, f"{ds.count} bands in a file of one band ({table.name} {band})")

    stored, crs, transform, nodata = _read_checked_geotiff(path, table, f"{table.name} {band}", check_layout)
    data = stored[0]
    target = np.dtype(table.dtype)
    if data.dtype != target:
        if data.size and target.kind in "ui":
            lo, hi = np.iinfo(target).min, np.iinfo(target).max
            if int(data.min()) < lo or int(data.max()) > hi:
                raise _BadFile(path, f"values {int(data.min())}..{int(data.max())} do not fit {table.dtype}")
        data = data.astype(target)
    return BandRead(data, crs, transform, nodata)


def read_modality(
    files: dict[str, str], table: Modality
) -> tuple[np.ndarray, str, tuple[float, ...], np.ndarray]:
    """Read one file per band of ``table`` onto the table's grid (``table.size`` pixels a side).

    Args:
        files: band name -> path, for every band of the table.

    Returns:
        (chw array, crs, transform of the output grid, invalid mask) where the mask covers declared
        nodata per band and the table's physical range.

    Raises:
        _BadFile: naming the first file that cannot be read or does not fit the patch's grid.
    """
    reads = {band: read_band(files[band], table, band) for band in table.bands}
    full = [b for b in table.bands if reads[b].data.shape == (table.size, table.size)]
    if not full:
        shapes = ", ".join(f"{b} {r.data.shape[0]}x{r.data.shape[1]}" for b, r in reads.items())
        raise _BadFile(
            files[table.bands[0]],
            f"no {table.name} band is {table.size}x{table.size} px (the 10 m grid); found {shapes}",
        )
    ref = reads[full[0]]
    out = np.empty(table.shape_chw, dtype=table.dtype)
    invalid = np.zeros(table.shape_chw, dtype=bool)
    for c, band in enumerate(table.bands):
        r = reads[band]
        h, w = r.data.shape
        if h != w or table.size % h:
            raise _BadFile(
                files[band], f"shape {h}x{w} is not an integer subdivision of {table.size}x{table.size}"
            )
        factor = table.size // h
        a, _, c0, _, e, f0 = r.transform
        ra, _, rc, _, re, rf = ref.transform
        if r.crs != ref.crs:
            raise _BadFile(files[band], f"CRS {r.crs} differs from {full[0]}'s {ref.crs}")
        scale_ok = abs(a - ra * factor) <= 1e-6 * abs(ra * factor) and abs(e - re * factor) <= 1e-6 * abs(
            re * factor
        )
        if not scale_ok or abs(c0 - rc) > _CORNER_TOLERANCE or abs(f0 - rf) > _CORNER_TOLERANCE:
            raise _BadFile(
                files[band],
                f"grid {r.transform} is not {full[0]}'s grid {ref.transform} at {factor}x the pixel size "
                "with the same corner",
            )
        out[c] = upsample_nearest(r.data, factor)
        invalid[c] = invalid_mask(table.name, out[c : c + 1], r.nodata, table)[0]
    return out, ref.crs, ref.transform, invalid


def assemble(
    group: PatchGroup,
    reads: dict[str, tuple[np.ndarray, str, tuple[float, ...], np.ndarray]],
    errors: list[dict[str, str]],
    options: ReadOptions,
    labels=None,
    grid_tolerance_m: float | None = _CORNER_TOLERANCE,
) -> Sample | Reject:
    """Check the modalities read for one sample and make it a ``Sample`` (or the ``Reject`` saying why).

    The checks are the SEN12MS ones: the invalid-pixel limits per modality (worst band) and, unless
    ``grid_tolerance_m`` is None, one grid for all modalities (same CRS and pixel size, corners within
    the tolerance). The sample's georeference is its S2 grid (else its first modality's); every
    modality's own grid is recorded in ``Sample.grids``.

    Args:
        reads: modality -> (chw, crs, transform, invalid mask), in storing order.
        errors: (file, reason) already found while reading; any makes the sample a reject.
        grid_tolerance_m: largest corner offset between modalities, in CRS units; None: modalities
            of one sample are paired by the source's rule, not by their grids (only recorded).
    """

    def reject() -> Reject:
        return Reject(
            key=group.key,
            reason="; ".join(f"{e['file']}: {e['reason']}" for e in errors),
            files=group.files,
            errors=errors,
        )

    first_file = {m: next(p[0] for k, p in group.files.items() if k.startswith(f"{m}:")) for m in reads}
    for mod, (_, _, _, invalid) in reads.items():
        fraction, limit = worst_band_fraction(invalid), options.max_invalid_fraction(mod)
        if fraction > limit:
            errors.append({"file": first_file[mod], "reason": invalid_reason(mod, fraction, limit)})
    if errors:
        return reject()
    ref_mod = "s2" if "s2" in reads else next(iter(reads))
    _, ref_crs, ref_transform, _ = reads[ref_mod]
    for mod, (_, crs, transform, _) in reads.items():
        if grid_tolerance_m is None:
            continue
        a, _, c, _, e, f = transform
        ra, _, rc, _, re, rf = ref_transform
        same_pixel = abs(a - ra) <= 1e-6 * abs(ra) and abs(e - re) <= 1e-6 * abs(re)
        near = abs(c - rc) <= grid_tolerance_m and abs(f - rf) <= grid_tolerance_m
        if crs != ref_crs or not same_pixel or not near:
            errors.append(
                {
                    "file": first_file[mod],
                    "reason": (
                        f"grid mismatch: {mod} is {crs} {transform}, {ref_mod} is {ref_crs} {ref_transform} "
                        f"(corners must agree within {grid_tolerance_m:g})"
                    ),
                }
            )
    if errors:
        return reject()
    return Sample(
        key=group.key,
        arrays={m: r[0] for m, r in reads.items()},
        crs=ref_crs,
        transform=ref_transform,
        files={k: p[0] for k, p in group.files.items()},
        invalid={m: r[3] for m, r in reads.items()},
        labels=labels,
        grids={m: {"crs": r[1], "transform": list(r[2])} for m, r in reads.items()},
    )
