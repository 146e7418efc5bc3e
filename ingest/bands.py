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
    """

    name: str
    bands: tuple[str, ...]
    dtype: str
    accepted_dtypes: tuple[str, ...]
    fill: float
    unit: str

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        return (self.channels, PATCH_SIZE, PATCH_SIZE)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape_chw)) * np.dtype(self.dtype).itemsize


S1 = Modality(
    name="s1",
    bands=("VV", "VH"),
    dtype="float32",
    accepted_dtypes=("float32",),
    fill=float("nan"),
    unit="backscatter sigma0 in dB (SEN12MS clips VV/VH to [-25, 0] only in some releases; eossl keeps values as stored)",
)
S2 = Modality(
    name="s2",
    # SEN12MS order: B8A sits after B8, so index 8 is B8A, not B9.
    bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
    dtype="uint16",
    accepted_dtypes=("uint16",),
    fill=0,
    unit="Sentinel-2 L1C top-of-atmosphere reflectance x 10000",
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
    1: 1, 2: 1, 3: 1, 4: 1, 5: 1,  # forests
    6: 2, 7: 2,  # shrublands
    8: 3, 9: 3,  # savannas
    10: 4,  # grassland
    11: 5,  # wetlands
    12: 6, 14: 6,  # croplands incl. cropland/natural vegetation mosaics
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
    1: "barren", 2: "permanent snow and ice", 3: "water bodies",
    11: "evergreen needleleaf forests", 12: "evergreen broadleaf forests", 13: "deciduous needleleaf forests",
    14: "deciduous broadleaf forests", 15: "mixed broadleaf/needleleaf forests",
    16: "mixed broadleaf evergreen/deciduous forests", 21: "open forests", 22: "sparse forests",
    31: "dense herbaceous", 32: "sparse herbaceous", 41: "dense shrublands", 42: "shrubland/grassland mosaics",
    43: "sparse shrublands",
}
LCCS_LU_CLASSES: dict[int, str] = {
    1: "barren", 2: "permanent snow and ice", 3: "water bodies", 9: "urban and built-up lands",
    10: "dense forests", 20: "open forests", 25: "forest/cropland mosaics", 30: "natural herbaceous",
    35: "natural herbaceous/croplands mosaics", 36: "herbaceous croplands", 40: "shrublands",
}
LCCS_SH_CLASSES: dict[int, str] = {
    1: "barren", 2: "permanent snow and ice", 3: "water bodies", 10: "dense forests", 20: "open forests",
    27: "woody wetlands", 30: "grasslands", 40: "shrublands", 50: "herbaceous wetlands", 51: "tundra",
}
