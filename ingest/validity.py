"""Which pixels of a patch are physically valid, per modality (ranges and legends live in bands.py).

Real exports carry undeclared fill values (S1 at 1e30 or -9999, S2 saturated at 65535, LC codes no
legend has), and a handful of them in one patch is enough to push a dataset's mean to 1e24. A pixel
is invalid when it is non-finite, equals the file's declared nodata, lies outside its modality's
``valid_range``, or (LC) is not a code of its layer's legend. Invalid pixels are counted and kept out
of the statistics; the arrays are written exactly as stored, because they are the data.
"""

from __future__ import annotations

import numpy as np

from .bands import LC_LEGENDS, MODALITIES, Modality

__all__ = ["invalid_mask", "invalid_reason", "worst_band_fraction"]


def _legend_lut(codes: frozenset[int]) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[list(codes)] = True
    return lut


_LC_LUTS = np.stack([_legend_lut(codes) for codes in LC_LEGENDS])  # (4, 256) True = in the legend


def invalid_mask(
    modality: str, chw: np.ndarray, nodata: float | None = None, table: Modality | None = None
) -> np.ndarray:
    """Boolean (C, H, W) mask, True where a pixel is not a valid measurement of ``modality``.

    Args:
        modality: ``s1``, ``s2`` or ``lc``.
        chw: the patch in eossl's stored dtype (``lc`` must already be uint8).
        nodata: the GeoTIFF's declared nodata value, if any.
        table: the source's band table of ``modality`` (default: SEN12MS's).
    """
    mod = table or MODALITIES[modality]
    if modality == "lc":
        return ~np.take_along_axis(_LC_LUTS, chw.reshape(chw.shape[0], -1).astype(np.intp), axis=1).reshape(
            chw.shape
        )
    invalid = ~np.isfinite(chw) if chw.dtype.kind == "f" else np.zeros(chw.shape, dtype=bool)
    if nodata is not None and np.isfinite(nodata):
        invalid |= chw == np.asarray(nodata).astype(chw.dtype)
    if mod.valid_range is not None:
        lo, hi = mod.valid_range
        with np.errstate(invalid="ignore"):
            invalid |= (chw < lo) | (chw > hi)
    return invalid


def worst_band_fraction(invalid: np.ndarray) -> float:
    """Largest per-band share of invalid pixels (a patch is judged by its worst band)."""
    if invalid.size == 0:
        return 0.0
    return float(invalid.reshape(invalid.shape[0], -1).mean(axis=1).max())


def invalid_reason(modality: str, fraction: float, limit: float, table: Modality | None = None) -> str:
    """Reject reason that says what was counted as invalid and what the limit is."""
    mod = table or MODALITIES[modality]
    if modality == "s1":
        lo, hi = mod.valid_range
        what = f"NaN/Inf/nodata pixels or values outside [{lo:g}, {hi:g}] dB"
    elif modality == "s2":
        lo, hi = mod.valid_range
        what = f"nodata (0), saturated (65535) or values above {hi:g} (reflectance {hi / 10000:g})"
    else:
        what = "class codes outside the layer's MODIS legend"
    return f"{modality.upper()} has {100 * fraction:.2f}% {what} in one band (limit {100 * limit:g}%)"
