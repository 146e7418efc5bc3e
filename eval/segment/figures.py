"""What a segmentation cell predicts, for people and for GIS: a figure per cell and GeoTIFF maps per patch.

Figure: one row per hold-out patch: the input as a person reads it (S1 false colour and/or S2 true colour,
from the stored values), the predicted map, the reference map (ignored pixels black) and one legend
of class colours shared by every panel. GeoTIFF: the predicted map as single-band uint8 in the scheme's
stored codes (1..10 for simplified IGBP, MODIS codes for the others; 0 = nodata), on the source patch's CRS
and transform, so it overlays the SEN12MS files it was predicted from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from eossl.ingest.format import ZARR_DIR
from eossl.ingest.storage import DatasetRoot

from ..attention.figure import LC_COLOURS, s1_composite, s2_true_colour
from .data import IGNORE_INDEX, LabelScheme

__all__ = ["class_colours", "plot_predictions", "write_map_geotiff"]

_IGNORED = (
    "#000000"  # ignored reference pixels: black, as "no data" in the land-cover panels of eossl attention
)


def class_colours(scheme: LabelScheme) -> list[str]:
    """One colour per class index: the MODIS palette of the land-cover figures for simplified IGBP,
    a qualitative palette otherwise."""
    if scheme.name == "igbp_simple":
        return list(LC_COLOURS[1:])
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(len(scheme.classes))]


def plot_predictions(
    path: Path,
    dataset: str,
    rows: list[int],
    keys: list[str],
    preds: list[np.ndarray],
    refs: list[np.ndarray],
    scheme: LabelScheme,
    sensors: tuple[str, ...],
    title: str,
) -> Path:
    """Input | prediction | reference for each patch; one legend over the classes shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    from .metrics import pixel_confusion, segmentation_scores

    group = zarr.open_group(DatasetRoot(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")
    colours = class_colours(scheme)
    k = len(colours)
    cmap = ListedColormap([*colours, _IGNORED])  # index k: ignored reference pixels
    norm = BoundaryNorm(np.arange(-0.5, k + 1), k + 1)
    inputs = [s for s in ("s1", "s2") if s in sensors]
    ncols = len(inputs) + 2
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(3.0 * ncols, 3.1 * len(rows) + 1.4),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    shown: set[int] = set()
    for r, (row, key, pred, ref) in enumerate(zip(rows, keys, preds, refs, strict=True)):
        panels = []
        for s in inputs:
            raw = np.asarray(group[s][row])
            panels.append(
                (
                    s1_composite(raw) if s == "s1" else s2_true_colour(raw),
                    "S1 R=VV G=VH B=VV-VH" if s == "s1" else "S2 true colour B4 B3 B2",
                    {},
                )
            )
        scores = segmentation_scores(pixel_confusion(pred, ref, k, IGNORE_INDEX))
        acc = scores["pixel_accuracy"]
        # Percent, as in the results tables.
        text = "" if acc is None else f"\npixel acc. {acc:.0%}, mIoU {100 * scores['miou']:.1f} %"
        panels.append((pred, f"prediction{text}", {"cmap": cmap, "norm": norm}))
        panels.append(
            (
                np.where(ref == IGNORE_INDEX, k, ref),
                "reference (black: ignored)",
                {"cmap": cmap, "norm": norm},
            )
        )
        shown |= {int(c) for c in np.unique(pred)} | {int(c) for c in np.unique(ref) if c != IGNORE_INDEX}
        for c, (img, label, kw) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
        axes[r, 0].set_ylabel(key, fontsize=8)
    handles = [Patch(facecolor=colours[c], edgecolor="0.3", label=scheme.classes[c]) for c in sorted(shown)]
    handles.append(Patch(facecolor=_IGNORED, edgecolor="0.3", label="ignored (no data)"))
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False
    )
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_map_geotiff(
    path: Path, pred: np.ndarray, scheme: LabelScheme, crs: str, transform: tuple[float, ...]
) -> Path:
    """Predicted class indices (H, W) -> a single-band uint8 GeoTIFF of the scheme's codes, nodata 0."""
    import rasterio
    from rasterio.transform import Affine

    codes = np.zeros(256, dtype=np.uint8)
    codes[: len(scheme.codes)] = scheme.codes
    data = codes[np.asarray(pred, dtype=np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint8",
        crs=crs,
        transform=Affine(*transform),
        nodata=0,
    ) as ds:
        ds.write(data[None])
        ds.update_tags(
            label_scheme=scheme.name,
            classes="; ".join(f"{c}={n}" for c, n in zip(scheme.codes, scheme.classes, strict=True)),
        )
    return path
