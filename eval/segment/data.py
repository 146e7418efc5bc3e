"""Per-pixel land-cover targets for segmentation: label schemes, the patch dataset, class weights,
georeference.

The targets come from the ``lc`` array that ingest stores per patch (4 layers of MODIS MCD12Q1 codes:
IGBP, LCCS-LC, LCCS-LU, LCCS-SH; docs/FORMAT.md). A scheme picks one layer and maps its codes to dense
0-based class indices with a lookup table; every other value (0 = no land cover, 255 = MODIS
"unclassified", a code the scheme does not know) becomes ``IGNORE_INDEX`` and is left out of the loss and
of every metric. A patch without land cover (``has_lc`` false) is not used at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zarr

from eossl.ingest.bands import (
    IGBP_CLASSES,
    IGBP_SIMPLE_CLASSES,
    LCCS_LC_CLASSES,
    LCCS_LU_CLASSES,
    LCCS_SH_CLASSES,
    igbp_to_simple_lut,
)
from eossl.ingest.format import ZARR_DIR
from eossl.ingest.storage import DatasetRoot
from eossl.streaming.inputs import InputSpec
from eossl.streaming.zarr_dataset import ZarrPatchDataset

__all__ = [
    "CLASS_WEIGHTINGS",
    "IGNORE_INDEX",
    "SEG_LABELS",
    "LabelScheme",
    "SegmentationPatches",
    "class_weights",
    "label_scheme",
    "patch_georef",
]

IGNORE_INDEX = 255
CLASS_WEIGHTINGS = ("none", "inverse_sqrt", "median_frequency")


@dataclass(frozen=True)
class LabelScheme:
    """One way to read the LC layer as classes.

    Attributes:
        name: CLI name (``igbp_simple``, ``igbp``, ``lccs_lc``, ``lccs_lu``, ``lccs_sh``).
        layer: index of the layer in the stored ``lc`` array (0 IGBP, 1 LCCS-LC, 2 LCCS-LU, 3 LCCS-SH).
        codes: the stored (MODIS or simplified) code of each class, class index i = codes[i].
        classes: class names, same order.
        lut: uint8[256], stored layer value -> class index, or IGNORE_INDEX.
    """

    name: str
    layer: int
    codes: tuple[int, ...]
    classes: tuple[str, ...]
    lut: np.ndarray

    def targets(self, lc: np.ndarray) -> np.ndarray:
        """(4, H, W) or (B, 4, H, W) stored lc -> (H, W) / (B, H, W) class indices (uint8, 255 = ignore)."""
        return self.lut[np.asarray(lc)[..., self.layer, :, :]]


def _scheme(
    name: str, layer: int, code_to_class: dict[int, int], codes: tuple[int, ...], classes: tuple[str, ...]
) -> LabelScheme:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for code, index in code_to_class.items():
        lut[code] = index
    return LabelScheme(name, layer, codes, classes, lut)


def _from_table(name: str, layer: int, table: dict[int, str]) -> LabelScheme:
    codes = tuple(sorted(table))
    return _scheme(name, layer, {c: i for i, c in enumerate(codes)}, codes, tuple(table[c] for c in codes))


_SIMPLE = igbp_to_simple_lut()
SEG_LABELS: dict[str, LabelScheme] = {
    # Simplified IGBP (10 classes, the SEN12MS benchmark scheme): IGBP code -> simplified code -> index.
    "igbp_simple": _scheme(
        "igbp_simple",
        0,
        {c: int(_SIMPLE[c]) - 1 for c in range(1, len(IGBP_CLASSES) + 1)},
        tuple(range(1, len(IGBP_SIMPLE_CLASSES) + 1)),
        IGBP_SIMPLE_CLASSES,
    ),
    "igbp": _scheme(
        "igbp",
        0,
        {c: c - 1 for c in range(1, len(IGBP_CLASSES) + 1)},
        tuple(range(1, len(IGBP_CLASSES) + 1)),
        IGBP_CLASSES,
    ),
    "lccs_lc": _from_table("lccs_lc", 1, LCCS_LC_CLASSES),
    "lccs_lu": _from_table("lccs_lu", 2, LCCS_LU_CLASSES),
    "lccs_sh": _from_table("lccs_sh", 3, LCCS_SH_CLASSES),
}


def label_scheme(name: str) -> LabelScheme:
    try:
        return SEG_LABELS[name]
    except KeyError:
        raise ValueError(f"segmentation label must be one of {list(SEG_LABELS)}, got {name!r}") from None


def _open(dataset: str) -> zarr.Group:
    return zarr.open_group(DatasetRoot(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")


class SegmentationPatches(torch.utils.data.Dataset):
    """Standardised patches and their per-pixel targets: ``{"x": (C, H, W) float32, "y": (H, W) int64, ...}``.

    Reads through ``ZarrPatchDataset`` (same inputs, normalisation and row selection as classification),
    keeping only patches that have land cover; ``y`` holds class indices of ``scheme`` or IGNORE_INDEX.
    """

    def __init__(self, dataset: str, inputs: InputSpec, rows, scheme: LabelScheme):
        self.patches = ZarrPatchDataset(dataset, inputs, rows=rows, label=None, with_lc=True)
        self.scheme = scheme

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def keys(self) -> np.ndarray:
        return self.patches.keys

    @property
    def rows(self) -> np.ndarray:
        return self.patches.rows

    @property
    def excluded(self) -> dict[str, int]:
        return self.patches.excluded

    @property
    def mean(self) -> np.ndarray:
        return self.patches.mean

    @property
    def std(self) -> np.ndarray:
        return self.patches.std

    def __getitem__(self, index: int) -> dict:
        item = self.patches[index]
        lc = item.pop("lc").numpy()
        item["y"] = torch.from_numpy(self.scheme.targets(lc).astype(np.int64))
        return item

    def pixel_counts(self) -> np.ndarray:
        """Valid pixels per class over every patch (int64, K): the training frequencies for class weights."""
        counts = np.zeros(256, dtype=np.int64)
        lc = _open(self.patches.dataset)["lc"]
        for row in self.rows:  # one chunk per row; only the scheme's layer is decoded into classes
            counts += np.bincount(
                self.scheme.lut[np.asarray(lc[int(row), self.scheme.layer])].ravel(), minlength=256
            )
        return counts[: len(self.scheme.classes)]


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
    """Cross-entropy class weights (float32, K) from training pixel counts.

    ``none``: all 1. ``inverse_sqrt``: w_c proportional to 1 / sqrt(f_c). ``median_frequency``: w_c =
    median(f) / f_c (Eigen & Fergus 2015), the median over the classes present. Classes without a training
    pixel get weight 0 (no pixel carries it). Weights are scaled so that the pixel-weighted mean is 1
    (sum_c f_c w_c = 1): the loss keeps the scale of the unweighted loss and the learning rate its meaning.
    """
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {CLASS_WEIGHTINGS}, got {mode!r}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("no valid training pixel: cannot weight classes")
    freq = counts / counts.sum()
    present = freq > 0
    w = np.zeros_like(freq)
    if mode == "none":
        w[present] = 1.0
    elif mode == "inverse_sqrt":
        w[present] = 1.0 / np.sqrt(freq[present])
    else:
        w[present] = np.median(freq[present]) / freq[present]
    return (w / (freq * w).sum()).astype(np.float32)


def patch_georef(dataset: str, rows: np.ndarray) -> list[tuple[str, tuple[float, ...]]]:
    """(CRS string, affine a, b, c, d, e, f) of each Zarr row, as ingest stored them (``crs``,
    ``transform``)."""
    group = _open(dataset)
    crs, transform = group["crs"][:], group["transform"][:]
    return [(str(crs[int(r)]), tuple(float(v) for v in transform[int(r)])) for r in rows]
