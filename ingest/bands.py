"""Band tables of the SEN12MS modalities: the one place that says what each array holds.

Every other module (reader, writer, statistics, streaming, evaluation) takes band names, order and
dtypes from here, so a band-order mistake can only be made once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "IGBP_CLASSES",
    "IGBP_SIMPLE_CLASSES",
    "IGBP_TO_SIMPLE",
    "LC",
    "LC_LEGENDS",
    "LC_UNCLASSIFIED",
    "LCCS_LC_CLASSES",
    "LCCS_LU_CLASSES",
    "LCCS_SH_CLASSES",
    "MODALITIES",
    "MODALITY_NAMES",
    "PATCH_SIZE",
    "S1",
    "S2",
    "S2_LAND_BANDS",
    "Modality",
    "igbp_to_simple_lut",
]

PATCH_SIZE = 256


@dataclass(frozen=True)
class Modality:
    """One sensor product of a SEN12MS triplet.

    Attributes:
        name: short name used in file names, shard members and Zarr arrays (``s1``, ``s2``, ``lc``).
        bands: band names in the order SEN12MS stores them.
        dtype: dtype stored by eossl (input is converted only when the conversion is lossless).
        accepted_dtypes: GeoTIFF dtypes accepted on input.
        fill: value written where a patch lacks this modality.
        unit: physical meaning of the values.
        valid_range: inclusive [low, high] of physically possible values; a pixel outside it (or
            non-finite, or the file's declared nodata) is invalid: counted, left as stored, and kept
            out of the statistics. ``None`` for class codes, which are checked against a legend.
        max_plausible_std: dataset-wide standard deviation of one band above which the band's spread
            cannot come from real scenes (the manifest flags it). ``None``: not checked.
        size: patch height and width in pixels on the stored grid (per source: SEN12MS 256, BigEarthNet
            120, SSL4EO-S12 264).
    """

    name: str
    bands: tuple[str, ...]
    dtype: str
    accepted_dtypes: tuple[str, ...]
    fill: float
    unit: str
    valid_range: tuple[float, float] | None = None
    max_plausible_std: float | None = None
    size: int = PATCH_SIZE

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def to_json(self) -> dict:
        """The band table as the manifest records it (what a reader needs without eossl's code)."""
        return {
            "bands": list(self.bands),
            "dtype": self.dtype,
            "fill": "NaN" if self.fill != self.fill else self.fill,  # NaN is not strict JSON
            "unit": self.unit,
            "valid_range": list(self.valid_range) if self.valid_range is not None else None,
            "size": self.size,
        }

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape_chw)) * np.dtype(self.dtype).itemsize


S1 = Modality(
    name="s1",
    bands=("VV", "VH"),
    dtype="float32",
    accepted_dtypes=("float32",),
    fill=float("nan"),
    unit=(
        "backscatter sigma0 in dB (SEN12MS clips VV/VH to [-25, 0] only in some releases; eossl keeps "
        "values as stored)"
    ),
    # Sigma0 of real scenes lies within about -50..+30 dB: the instrument noise floor (NESZ) of IW GRD is
    # about -22 dB and nothing darker than ~25 dB below it is measured; the brightest urban double-bounce
    # and corner-reflector returns reach +20..+30 dB (real SEN12MS VV is sometimes clipped at 0 dB).
    # 10 dB of margin on both sides: [-60, +40] dB. Outside it a value is a fill or a corrupt export
    # (1e30, -9999, log10 of 0), not backscatter.
    valid_range=(-60.0, 40.0),
    # A 50/50 mix of calm water (-25 dB) and dense urban (+5 dB), the widest spread of real land cover,
    # has a std of 15 dB; above 20 dB the band holds values no scene produces.
    max_plausible_std=20.0,
)
S2 = Modality(
    name="s2",
    # SEN12MS order: B8A sits after B8, so index 8 is B8A, not B9.
    bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
    dtype="uint16",
    accepted_dtypes=("uint16",),
    fill=0,
    unit="Sentinel-2 L1C top-of-atmosphere reflectance x 10000",
    # L1C encodes no data as 0 and saturated pixels as 65535. Top-of-atmosphere reflectance of real
    # surfaces and clouds stays below ~1.6 (16,000) even for bright clouds at low sun; 2.0 (20,000) leaves
    # margin, and a value above it is a fill or a corrupt export, not reflectance.
    valid_range=(1.0, 20000.0),
    # A 50/50 mix of reflectance 0 (deep water) and 1.0 (fresh snow) has a std of 5,000: the widest
    # spread real scenes can give one band.
    max_plausible_std=5000.0,
)
LC = Modality(
    name="lc",
    bands=("IGBP", "LCCS_LC", "LCCS_LU", "LCCS_SH"),
    # Real SEN12MS LC files are uint8; some re-exports are uint16. All class codes fit in uint8, so
    # eossl stores uint8 and rejects a file whose values do not fit (nothing is silently truncated).
    dtype="uint8",
    accepted_dtypes=("uint8", "uint16"),
    fill=0,
    unit="MODIS MCD12Q1 class codes",
    # Checked per layer against its legend (LC_LEGENDS), not a range.
)

MODALITIES: dict[str, Modality] = {m.name: m for m in (S1, S2, LC)}
MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)

# The 10 land bands of the SEN12MS classification benchmark (B1, B9, B10 are atmospheric bands).
S2_LAND_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")

# IGBP classes as coded in MODIS MCD12Q1 (1..17); index i of the tuple is class code i+1.
IGBP_CLASSES: tuple[str, ...] = (
    "evergreen needleleaf forest",
    "evergreen broadleaf forest",
    "deciduous needleleaf forest",
    "deciduous broadleaf forest",
    "mixed forest",
    "closed shrublands",
    "open shrublands",
    "woody savannas",
    "savannas",
    "grasslands",
    "permanent wetlands",
    "croplands",
    "urban and built-up",
    "cropland/natural vegetation mosaic",
    "permanent snow and ice",
    "barren",
    "water bodies",
)

# Simplified IGBP scheme of the SEN12MS classification benchmark (Schmitt & Wu 2021): 10 classes.
IGBP_SIMPLE_CLASSES: tuple[str, ...] = (
    "forest",
    "shrubland",
    "savanna",
    "grassland",
    "wetlands",
    "croplands",
    "urban/built-up",
    "snow/ice",
    "barren",
    "water",
)

# IGBP code (1..17) -> simplified class code (1..10).
IGBP_TO_SIMPLE: dict[int, int] = {
    1: 1,
    2: 1,
    3: 1,
    4: 1,
    5: 1,  # forests
    6: 2,
    7: 2,  # shrublands
    8: 3,
    9: 3,  # savannas
    10: 4,  # grassland
    11: 5,  # wetlands
    12: 6,
    14: 6,  # croplands incl. cropland/natural vegetation mosaics
    13: 7,  # urban
    15: 8,  # snow/ice
    16: 9,  # barren
    17: 10,  # water
}


def igbp_to_simple_lut() -> np.ndarray:
    """Lookup table uint8[256]: IGBP code -> simplified code; 0 for codes outside 1..17 (no data)."""
    lut = np.zeros(256, dtype=np.uint8)
    for igbp, simple in IGBP_TO_SIMPLE.items():
        lut[igbp] = simple
    return lut


# The three FAO LCCS layers of MODIS MCD12Q1 (collection 6 user guide, tables 5-7), as stored in SEN12MS
# LC bands 2-4: MODIS code -> class name. 255 ("unclassified") is not a class.
LCCS_LC_CLASSES: dict[int, str] = {
    1: "barren",
    2: "permanent snow and ice",
    3: "water bodies",
    11: "evergreen needleleaf forests",
    12: "evergreen broadleaf forests",
    13: "deciduous needleleaf forests",
    14: "deciduous broadleaf forests",
    15: "mixed broadleaf/needleleaf forests",
    16: "mixed broadleaf evergreen/deciduous forests",
    21: "open forests",
    22: "sparse forests",
    31: "dense herbaceous",
    32: "sparse herbaceous",
    41: "dense shrublands",
    42: "shrubland/grassland mosaics",
    43: "sparse shrublands",
}
LCCS_LU_CLASSES: dict[int, str] = {
    1: "barren",
    2: "permanent snow and ice",
    3: "water bodies",
    9: "urban and built-up lands",
    10: "dense forests",
    20: "open forests",
    25: "forest/cropland mosaics",
    30: "natural herbaceous",
    35: "natural herbaceous/croplands mosaics",
    36: "herbaceous croplands",
    40: "shrublands",
}
LCCS_SH_CLASSES: dict[int, str] = {
    1: "barren",
    2: "permanent snow and ice",
    3: "water bodies",
    10: "dense forests",
    20: "open forests",
    27: "woody wetlands",
    30: "grasslands",
    40: "shrublands",
    50: "herbaceous wetlands",
    51: "tundra",
}

# MODIS MCD12Q1 writes 255 ("unclassified") in every layer: a documented value, not a class, and not an
# error. Labels ignore it like any code outside 1..17.
LC_UNCLASSIFIED = 255

# Codes a valid LC file may hold, per band in LC.bands order. Any other code is invalid: counted, and a
# patch with more than ``max_lc_invalid_fraction`` of them in one layer is rejected (its file is not a
# MODIS land-cover export of the documented collection).
LC_LEGENDS: tuple[frozenset[int], ...] = tuple(
    frozenset(codes) | {LC_UNCLASSIFIED}
    for codes in (
        range(1, len(IGBP_CLASSES) + 1),
        LCCS_LC_CLASSES,
        LCCS_LU_CLASSES,
        LCCS_SH_CLASSES,
    )
)
