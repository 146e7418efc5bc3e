"""The real SEN12MS patches shipped with eossl (CC-BY-4.0, see sample_patches/README.md).

Four GeoTIFFs from two locations, deliberately incomplete (p30 has no S2, p839 no land cover): the
exactness tests, the encoding benchmark and the generator's calibration use them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REAL_PATCHES_DIR"]

REAL_PATCHES_DIR = Path(__file__).resolve().parent / "sample_patches"
