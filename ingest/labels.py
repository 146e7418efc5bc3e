"""Scene-classification labels from the IGBP layer, following the SEN12MS classification protocol.

Schmitt & Wu (2021) derive each patch's labels from the class histogram of the MODIS IGBP layer:
single-label = the majority class, multi-label = every class covering at least a threshold fraction
of the patch (10 % in their code). Both the full (17) and simplified (10) IGBP schemes are stored.
Codes stay 1-based as in MODIS (0 = no label) so they read the same in metadata, Zarr and papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES, igbp_to_simple_lut

__all__ = ["PatchLabels", "patch_labels"]

_SIMPLE_LUT = igbp_to_simple_lut()


@dataclass(frozen=True)
class PatchLabels:
    """Labels of one patch. Fractions are over the pixels with a valid IGBP code (1..17).

    Attributes:
        igbp_fractions: area fraction of each IGBP class, index i = code i+1 (17 values).
        simple_fractions: the same for the 10 simplified classes.
        igbp: majority IGBP code (1..17), 0 when no pixel is valid; ties go to the lower code.
        igbp_simple: majority simplified code (1..10), computed on simplified fractions (so two forest
            types together can outvote a single larger class, as in the benchmark code).
        igbp_multi / igbp_simple_multi: codes whose fraction is at least ``threshold``.
        valid_fraction: share of the patch with a valid IGBP code.
        threshold: multi-label area threshold used.
    """

    igbp_fractions: tuple[float, ...]
    simple_fractions: tuple[float, ...]
    igbp: int
    igbp_simple: int
    igbp_multi: tuple[int, ...]
    igbp_simple_multi: tuple[int, ...]
    valid_fraction: float
    threshold: float

    def to_json(self) -> dict:
        return asdict(self)


def _majority(fractions: np.ndarray) -> int:
    return int(np.argmax(fractions)) + 1 if fractions.sum() > 0 else 0


def _multi(fractions: np.ndarray, threshold: float) -> tuple[int, ...]:
    if fractions.sum() == 0:
        return ()
    return tuple(int(i) + 1 for i in np.flatnonzero(fractions >= threshold))


def patch_labels(igbp: np.ndarray, threshold: float = 0.1) -> PatchLabels:
    """Labels from a 2-D IGBP code map (any integer dtype; codes outside 1..17 are no data)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"multi-label threshold must be in (0, 1], got {threshold}")
    codes = np.asarray(igbp).astype(np.int64, copy=False).ravel()
    counts = np.bincount(np.clip(codes, 0, 255), minlength=256)
    igbp_counts = counts[1 : len(IGBP_CLASSES) + 1].astype(np.float64)
    valid = igbp_counts.sum()
    simple_counts = np.zeros(len(IGBP_SIMPLE_CLASSES), dtype=np.float64)
    np.add.at(simple_counts, _SIMPLE_LUT[1 : len(IGBP_CLASSES) + 1].astype(np.int64) - 1, igbp_counts)
    igbp_frac = igbp_counts / valid if valid else igbp_counts
    simple_frac = simple_counts / valid if valid else simple_counts
    return PatchLabels(
        igbp_fractions=tuple(round(float(v), 6) for v in igbp_frac),
        simple_fractions=tuple(round(float(v), 6) for v in simple_frac),
        igbp=_majority(igbp_frac),
        igbp_simple=_majority(simple_frac),
        igbp_multi=_multi(igbp_frac, threshold),
        igbp_simple_multi=_multi(simple_frac, threshold),
        valid_fraction=round(float(valid / codes.size), 6) if codes.size else 0.0,
        threshold=threshold,
    )
