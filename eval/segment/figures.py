"""What a segmentation cell predicts, for people and for GIS: a figure per cell and GeoTIFF maps per patch.

Figure: one row per hold-out patch: the input as a person reads it (S1 false colour and/or S2 true colour,
from the stored values), the predicted map, the reference map (ignored pixels black) and one legend
of class colours shared by every panel. GeoTIFF: the predicted map as single-band uint8 in the scheme's
stored codes (1..10 for simplified IGBP, MODIS codes for the others; 0 = nodata), on the source patch's CRS
and transform, so it overlays the SEN12MS files it was predicted from.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import zarr

from eossl.ingest.format import ZARR_DIR
from eossl.ingest.storage import DatasetRoot

from ..attention.figure import LC_COLOURS, s1_composite, s2_true_colour
from .data import IGNORE_INDEX, LabelScheme

__all__ = [
    "class_colours",
    "map_colormap",
    "map_description",
    "plot_predictions",
    "write_map_geotiff",
    "write_scene_mosaics",
]

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


def map_colormap(scheme: LabelScheme) -> dict[int, tuple[int, int, int, int]]:
    """Stored code -> RGBA for the GeoTIFF colour table: the class colours of the figures, 0 (nodata)
    transparent. Every one of the 256 entries is given, as GDAL's palette has them."""
    from matplotlib.colors import to_rgb

    table = {code: (0, 0, 0, 0) for code in range(256)}
    for code, colour in zip(scheme.codes, class_colours(scheme), strict=True):
        table[int(code)] = (*(round(255 * v) for v in to_rgb(colour)), 255)
    return table


def map_description(scheme: LabelScheme) -> str:
    """The band description GIS shows for a predicted map: what the values are."""
    return f"predicted {scheme.name} class code (0 = nodata)"


def write_map_geotiff(
    path: Path, pred: np.ndarray, scheme: LabelScheme, crs: str, transform: tuple[float, ...]
) -> Path:
    """Predicted class indices (H, W) -> a single-band uint8 GeoTIFF of the scheme's codes, nodata 0.

    The band carries a colour table (the figures' class colours; QGIS and GDAL draw it as a paletted
    raster) and a description, so the map opens in colour with no style file.
    """
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
        ds.write_colormap(1, map_colormap(scheme))
        ds.set_band_description(1, map_description(scheme))
        ds.update_tags(
            label_scheme=scheme.name,
            classes="; ".join(f"{c}={n}" for c, n in zip(scheme.codes, scheme.classes, strict=True)),
        )
    return path


def _scene_of(key: str) -> str:
    """``ROIs1158_spring_1_p30`` -> ``ROIs1158_spring_1`` (sample keys end in ``_p<patch>``)."""
    scene, sep, patch = key.rpartition("_p")
    if not sep or not patch.isdigit():
        raise ValueError(f"{key!r} is not a sample key (<ROI>_<season>_<scene>_p<patch>)")
    return scene


def _offset(value: float, origin: float, step: float, path: Path) -> int:
    pixels = (value - origin) / step
    if abs(pixels - round(pixels)) > 1e-6:
        raise ValueError(f"{path}: not on the pixel grid of the scene's other patches ({pixels} pixels)")
    return round(pixels)


def _colormap(ds) -> dict[int, tuple[int, ...]] | None:
    try:
        return ds.colormap(1)
    except ValueError:  # no colour table
        return None


def _vrt_xml(paths: list[Path]) -> str:
    """A VRT (beside the files) mosaicking single-band uint8 GeoTIFFs on one north-up grid; later
    patches lie on top where they overlap, their nodata (0) letting the ones below show."""
    import rasterio

    infos = []
    for path in paths:
        with rasterio.open(path) as ds:
            infos.append((path, ds.width, ds.height, ds.transform, ds.crs, _colormap(ds), ds.descriptions[0]))
    _, _, _, t0, crs0, colormap, description = infos[0]
    for path, _w, _h, t, crs, _c, _d in infos:
        if crs != crs0 or (t.a, t.b, t.d, t.e) != (t0.a, t0.b, t0.d, t0.e) or t.b or t.d:
            raise ValueError(
                f"{path}: CRS or pixel size differs from {infos[0][0]} (or the grid is rotated); "
                "the patches of one scene share one north-up grid"
            )
    left = min(i[3].c for i in infos)
    top = max(i[3].f for i in infos)
    places = [
        (path, w, h, _offset(t.c, left, t0.a, path), _offset(t.f, top, t0.e, path))
        for path, w, h, t, *_ in infos
    ]
    width = max(x + w for _p, w, _h, x, _y in places)
    height = max(y + h for _p, _w, h, _x, y in places)
    palette = (
        "    <ColorInterp>Palette</ColorInterp>\n    <ColorTable>\n"
        + "".join('      <Entry c1="{}" c2="{}" c3="{}" c4="{}"/>\n'.format(*colormap[i]) for i in range(256))
        + "    </ColorTable>\n"
        if colormap
        else ""  # maps written without a colour table: a grey mosaic
    )
    sources = "".join(
        "    <ComplexSource>\n"
        f'      <SourceFilename relativeToVRT="1">{escape(path.name)}</SourceFilename>\n'
        "      <SourceBand>1</SourceBand>\n"
        f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>\n'
        f'      <DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>\n'
        "      <NODATA>0</NODATA>\n"
        "    </ComplexSource>\n"
        for path, w, h, x, y in places
    )
    geo = ", ".join(repr(float(v)) for v in (left, t0.a, 0.0, top, 0.0, t0.e))
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(crs0.to_wkt())}</SRS>\n"
        f"  <GeoTransform>{geo}</GeoTransform>\n"
        '  <VRTRasterBand dataType="Byte" band="1">\n'
        f"    <Description>{escape(description or '')}</Description>\n"
        "    <NoDataValue>0</NoDataValue>\n"
        f"{palette}"
        f"{sources}"
        "  </VRTRasterBand>\n"
        "</VRTDataset>\n"
    )


def write_scene_mosaics(folder: Path) -> list[Path]:
    """One ``<scene>.vrt`` per scene in ``folder`` mosaicking its predicted patch maps (``<key>.tif``).

    A VRT is a few lines of XML pointing at the patch files (relative paths: the folder can move), so a
    scene opens as one layer in QGIS or GDAL, in the patches' colours, with no copy of the pixels. SEN12MS
    patches overlap by half; where they do, the patch whose file name sorts later is shown.
    """
    by_scene: dict[str, list[Path]] = {}
    for path in sorted(Path(folder).glob("*.tif")):
        by_scene.setdefault(_scene_of(path.stem), []).append(path)
    written = []
    for scene, paths in sorted(by_scene.items()):
        target = Path(folder) / f"{scene}.vrt"
        target.write_text(_vrt_xml(paths))
        written.append(target)
    return written
