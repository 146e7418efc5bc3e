"""Synthetic trees in the layouts of other sources (BigEarthNet-MM, reBEN, SSL4EO-S12), for tests and trials.

The ground is made as for SEN12MS (``sample_data``: one land-cover map per patch behind both sensors,
class spectra and backscatter, texture, speckle), then written the way the source stores it: one
GeoTIFF per band at the band's native resolution (20 m and 60 m bands as block means of the 10 m
field, which is what a coarser detector integrates), the source's names, dtypes, metadata files and
label spellings.

Calibration of BigEarthNet-MM: the synthetic S2 is scaled per band (``l2a_gain``) so that its mean
over a fixed calibration set of patches matches the published BigEarthNet-S2 band means (L2A x 10000:
B01 341, B02 430, B03 614, B04 590, B05 951, B06 1792, B07 2075, B08 2219, B8A 2266, B09 2246, B11 1594,
B12 1009; the statistics every BigEarthNet model normalises with). S1 keeps the SEN12MS backscatter per
class (BigEarthNet-S1 VV/VH means are -12.6 / -19.3 dB, within the range of those classes), unclipped
as BigEarthNet-S1 stores it. SSL4EO-S12's L1C is the SEN12MS-calibrated L1C (both are L1C x 10000).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine

from .bigearthnet import _S2_FILE_BAND, BEN19_CLASSES, BEN_S2, CORINE_TO_BEN19
from .reben import FLAG_COLUMNS, SNOW_CLOUD_TABLE
from .sample_data import (
    _CLASSES,
    _IGBP_CODES,
    _S2_RES_M,
    _s1_patch,
    _s2_patch,
    _scene_maps,
    _smooth_fields,
    _write_tif,
)

__all__ = [
    "BEN_S2_MEANS",
    "l2a_gain",
    "write_bigearthnet_sample",
    "write_reben_sample",
    "write_reben_table",
    "write_ssl4eo_sample",
]

# Published BigEarthNet-S2 (v1.0) band means, BEN_S2.bands order.
BEN_S2_MEANS = (341.0, 430.0, 614.0, 590.0, 951.0, 1792.0, 2075.0, 2219.0, 2266.0, 2246.0, 1594.0, 1009.0)
_S2_INDEX = [
    ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12").index(b)
    for b in BEN_S2.bands
]
_RES = {b: _S2_RES_M[i] for b, i in zip(BEN_S2.bands, _S2_INDEX, strict=True)}

# CORINE label a synthetic IGBP class stands for (real spellings of BigEarthNet's metadata). Snow (15)
# becomes bare rock, one of the labels without a 19-class counterpart.
_CORINE_OF_IGBP = {
    4: "Broad-leaved forest",
    5: "Mixed forest",
    7: "Sclerophyllous vegetation",
    8: "Transitional woodland/shrub",
    9: "Natural grassland",
    10: "Pastures",
    11: "Inland marshes",
    12: "Non-irrigated arable land",
    13: "Discontinuous urban fabric",
    14: "Complex cultivation patterns",
    15: "Bare rock",
    16: "Sparsely vegetated areas",
    17: "Water bodies",
}
_PIXEL_M = 10.0
_CALIBRATION_PATCHES = 24


def _block_mean(band: np.ndarray, factor: int) -> np.ndarray:
    h, w = band.shape
    return band.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _ground(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, ground class index map, textures) of one synthetic patch."""
    dominant = int(rng.choice(_IGBP_CODES))
    partners = list(_CLASSES[dominant].partners)
    extra = rng.choice(partners, size=int(rng.integers(1, min(3, len(partners)) + 1)), replace=False)
    classes = np.array([dominant, *sorted(int(c) for c in extra)], dtype=np.uint8)
    bias = np.concatenate([[0.9], rng.uniform(-0.4, 0.1, len(classes) - 1)]).astype(np.float32)
    _, ground = _scene_maps(rng, (size, size), classes, bias)
    bright, vigour, s1_tex = _smooth_fields(
        rng, (size, size), [{0.7: 0.8, 4.0: 0.6, 16.0: 1.0}, {3.0: 0.5, 12.0: 1.0}, {1.0: 0.6, 5.0: 1.0}]
    )
    tex = np.stack([bright, vigour, np.zeros_like(bright), s1_tex])
    return classes, ground, tex


@functools.cache
def l2a_gain() -> dict[str, float]:
    """Per-band factor (band name -> gain) from the synthetic L1C to BigEarthNet's L2A levels.

    Measured once per process on a fixed set of synthetic patches (their own seeds, so the factor does
    not depend on the tree being written): the ratio of the published BigEarthNet-S2 band means to the
    synthetic L1C means. It stands for the atmospheric correction (haze removed from the blue bands,
    little change in the NIR) and is applied to SSL4EO-S12's L2A product as well.
    """
    means = np.zeros(13)
    for k in range(_CALIBRATION_PATCHES):
        prng = np.random.default_rng([0, 99, k])
        classes, ground, tex = _ground(prng, BEN_S2.size)
        l1c, _ = _sensors(prng, classes, ground, tex)
        means += l1c.reshape(13, -1).mean(axis=1) / _CALIBRATION_PATCHES
    return {b: float(m / means[i]) for b, m, i in zip(BEN_S2.bands, BEN_S2_MEANS, _S2_INDEX, strict=True)}


def _sensors(rng: np.random.Generator, classes, ground, tex) -> tuple[np.ndarray, np.ndarray]:
    """(13-band L1C-like S2 uint16, S1 dB float32) of one patch."""
    scene_s2 = np.array([_CLASSES[c].s2 for c in classes], dtype=np.float32)
    scene_s1 = np.array([_CLASSES[c].s1_db for c in classes], dtype=np.float32)
    scene_tex = np.array([_CLASSES[c].texture for c in classes], dtype=np.float32)
    s2 = _s2_patch(rng, ground, tex, scene_s2, scene_tex, float(rng.normal(1.0, 0.04)))
    s1 = _s1_patch(rng, ground, tex, scene_s1, scene_tex)
    # SEN12MS clips S1 at 0 dB; the other sources do not: add the bright tail back for strong scatterers.
    s1 = np.where(s1 >= 0.0, rng.uniform(0.0, 6.0, s1.shape), s1).astype(np.float32)
    return s2, s1


def _write_ben_patch(
    prng: np.random.Generator, s2_dir: Path, s2_name: str, s1_dir: Path, s1_name: str, x: float, y: float
) -> tuple[list[Path], list[str]]:
    """Write one BigEarthNet patch's S2 band files and S1 VV/VH (v1.0 and reBEN store them alike).

    Returns:
        (files written, the CORINE labels of its ground: classes covering at least 5 % of the patch).
    """
    crs = CRS.from_epsg(32633)
    written: list[Path] = []
    classes, ground, tex = _ground(prng, BEN_S2.size)
    l1c, s1 = _sensors(prng, classes, ground, tex)
    for band, idx in zip(BEN_S2.bands, _S2_INDEX, strict=True):
        factor = _RES[band] // 10
        field = _block_mean(l1c[idx].astype(np.float64) * l2a_gain()[band], factor)
        data = np.clip(np.rint(field), 1, 65535).astype(np.uint16)
        transform = Affine(_PIXEL_M * factor, 0.0, x, 0.0, -_PIXEL_M * factor, y)
        path = s2_dir / f"{s2_name}_{_S2_FILE_BAND[band]}.tif"
        _write_tif(path, data[None], crs, transform)
        written.append(path)
    for c, pol in enumerate(("VV", "VH")):
        path = s1_dir / f"{s1_name}_{pol}.tif"
        _write_tif(path, s1[c : c + 1], crs, Affine(_PIXEL_M, 0.0, x, 0.0, -_PIXEL_M, y))
        written.append(path)
    counts = np.bincount(ground.ravel(), minlength=len(classes)) / ground.size
    labels = sorted({_CORINE_OF_IGBP[int(classes[k])] for k in np.flatnonzero(counts >= 0.05)})
    return written, labels


def _check_patches(patches: int, seed: int) -> None:
    if patches < 1:
        raise ValueError(f"patches must be >= 1, got {patches}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def write_bigearthnet_sample(
    out_dir: str | Path, patches: int = 8, seed: int = 0, patches_per_product: int = 4
) -> list[Path]:
    """Write a synthetic BigEarthNet-MM (v1.0) tree: ``BigEarthNet-v1.0/`` and ``BigEarthNet-S1-v1.0/``.

    Patches of one S2 product are neighbours on its 1200 m grid (row/col in the name). The first patch
    of the second product is listed in ``patches_with_cloud_and_shadow.csv`` and the last one in
    ``patches_with_seasonal_snow.csv``, as the dataset's lists name patches.

    Returns:
        Every file written (GeoTIFFs, metadata, lists).
    """
    _check_patches(patches, seed)
    out = Path(out_dir)
    written: list[Path] = []
    names: list[str] = []
    for p in range(patches):
        product_index, j = divmod(p, patches_per_product)
        prng = np.random.default_rng([seed, 7, p])
        date = f"2017{6 + product_index % 6:02d}{13 + product_index % 10:02d}"
        s2_product = f"S2A_MSIL2A_{date}T101031"
        row, col = 40 + j // 2, 45 + j % 2
        s2_name = f"{s2_product}_{row}_{col}"
        s1_name = f"S1A_IW_GRDH_1SDV_{date}T165043_33UUP_{row}_{col}"
        crs = CRS.from_epsg(32633)
        x, y = 300_000.0 + 1200.0 * col + 120_000.0 * product_index, 5_600_000.0 - 1200.0 * row
        s2_dir, s1_dir = out / "BigEarthNet-v1.0" / s2_name, out / "BigEarthNet-S1-v1.0" / s1_name
        files, labels = _write_ben_patch(prng, s2_dir, s2_name, s1_dir, s1_name, x, y)
        written += files
        if j % 3 == 2:  # a road crosses some patches: a label without a 19-class counterpart
            labels.append("Road and rail networks and associated land")
        coords = {"ulx": x, "uly": y, "lrx": x + 1200.0, "lry": y - 1200.0}
        s2_meta = {
            "labels": labels,
            "coordinates": coords,
            "projection": crs.to_wkt(),
            "tile_source": f"S2A_MSIL1C_{date}T101031_N0205_R022_T33UUP_{date}T101525",
            "acquisition_date": f"{date[:4]}-{date[4:6]}-{date[6:]} 10:10:31",
        }
        s1_meta = {
            "labels": labels,
            "coordinates": coords,
            "projection": crs.to_wkt(),
            "corresponding_s2_patch": s2_name,
            "scene_source": f"S1A_IW_GRDH_1SDV_{date}T165043_{date}T165108_017011_01C5E8_6D58",
            "acquisition_time": f"{date[:4]}-{date[4:6]}-{date[6:]}T16:50:43",
        }
        for folder, name, meta in ((s2_dir, s2_name, s2_meta), (s1_dir, s1_name, s1_meta)):
            path = folder / f"{name}_labels_metadata.json"
            path.write_text(json.dumps(meta, indent=4))
            written.append(path)
        names.append(s2_name)
    lists = {
        "patches_with_cloud_and_shadow.csv": names[patches_per_product : patches_per_product + 1],
        "patches_with_seasonal_snow.csv": names[-1:] if patches > patches_per_product + 1 else [],
    }
    for file, listed in lists.items():
        path = out / file
        path.write_text("".join(f"{n}\n" for n in listed))
        written.append(path)
    return written


_COUNTRIES = ("Austria", "Belgium", "Finland", "Ireland", "Lithuania", "Portugal", "Serbia", "Switzerland")


def write_reben_table(path: str | Path, rows: list[dict]) -> Path:
    """Write rows (``patch_id``, ``labels`` (list), ``split``, ``country``, ``s1_name``, flags) as reBEN
    does: parquet with a list column, or (a ``.csv`` path, the form read without pyarrow) labels joined
    by ``;``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ("patch_id", "labels", "split", "country", "s1_name", *FLAG_COLUMNS)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                writer.writerow([";".join(r[c]) if c == "labels" else r[c] for c in columns])
        return path
    import pyarrow as pa  # noqa: PLC0415 - only a parquet table needs it
    import pyarrow.parquet as pq  # noqa: PLC0415

    table = pa.table(
        {
            c: pa.array([r[c] for r in rows], type=pa.list_(pa.string()) if c == "labels" else None)
            for c in columns
        }
    )
    pq.write_table(table, path)
    return path


def write_reben_sample(
    out_dir: str | Path,
    patches: int = 8,
    seed: int = 0,
    patches_per_product: int = 4,
    table_format: str = "parquet",
) -> list[Path]:
    """Write a synthetic reBEN (BigEarthNet v2.0) tree: ``BigEarthNet-S2/``, ``BigEarthNet-S1/``, two tables.

    Names and folders as reBEN spells them (``BigEarthNet-S2/<tile product>/<patch_id>/``, patch ids like
    ``S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_40_45``; ``BigEarthNet-S1/<S1 product>/<s1_name>/``),
    no metadata file per folder: ``metadata.parquet`` pairs and labels them (19-class names; the split
    of the k-th S2 product is train, validation, test in turn; countries in turn). The first patch of the
    second product is flagged ``contains_cloud_or_shadow`` and the last one ``contains_seasonal_snow``
    and, as in reBEN, listed in ``metadata_for_patches_with_snow_cloud_or_shadow.parquet`` instead.
    ``table_format="csv"`` writes the tables as CSV (what the ingest reads without pyarrow).

    Returns:
        Every file written (GeoTIFFs and tables).
    """
    _check_patches(patches, seed)
    if table_format not in ("parquet", "csv"):
        raise ValueError(f"table_format must be parquet or csv, got {table_format!r}")
    out = Path(out_dir)
    written: list[Path] = []
    rows: list[dict] = []
    for p in range(patches):
        product_index, j = divmod(p, patches_per_product)
        prng = np.random.default_rng([seed, 17, p])
        date = f"2017{6 + product_index % 6:02d}{13 + product_index % 10:02d}"
        s2_product = f"S2A_MSIL2A_{date}T101031_N9999_R022_T33UUP"
        s1_product = f"S1A_IW_GRDH_1SDV_{date}T165043"
        row, col = 40 + j // 2, 45 + j % 2
        s2_name, s1_name = f"{s2_product}_{row}_{col}", f"{s1_product}_33UUP_{row}_{col}"
        x, y = 300_000.0 + 1200.0 * col + 120_000.0 * product_index, 5_600_000.0 - 1200.0 * row
        s2_dir = out / "BigEarthNet-S2" / s2_product / s2_name
        s1_dir = out / "BigEarthNet-S1" / s1_product / s1_name
        files, corine = _write_ben_patch(prng, s2_dir, s2_name, s1_dir, s1_name, x, y)
        written += files
        codes = sorted({CORINE_TO_BEN19[lab] for lab in corine if lab in CORINE_TO_BEN19})
        rows.append(
            {
                "patch_id": s2_name,
                "labels": [BEN19_CLASSES[c - 1] for c in codes],
                "split": ("train", "validation", "test")[product_index % 3],
                "country": _COUNTRIES[product_index % len(_COUNTRIES)],
                "s1_name": s1_name,
                "contains_seasonal_snow": patches > patches_per_product + 1 and p == patches - 1,
                "contains_cloud_or_shadow": p == patches_per_product,
            }
        )
    flagged = [r for r in rows if any(r[c] for c in FLAG_COLUMNS)]
    clean = [r for r in rows if r not in flagged]
    suffix = ".csv" if table_format == "csv" else ".parquet"
    written.append(write_reben_table(out / f"metadata{suffix}", clean))
    written.append(write_reben_table(out / SNOW_CLOUD_TABLE.replace(".parquet", suffix), flagged))
    return written


# SSL4EO-S12 acquisition ids: S2 as Earth Engine writes them (sensing start, datastrip, tile), S1 as the
# GRD product name; one per season, from the spring equinox on.
_SEASON_DAYS = ("0321", "0622", "0923", "1221")


def write_ssl4eo_sample(
    out_dir: str | Path, locations: int = 3, seed: int = 0, size: int = 264
) -> list[Path]:
    """Write a synthetic SSL4EO-S12 tree: ``s1/``, ``s2c/`` (L1C, 13 bands) and ``s2a/`` (L2A, 12 bands).

    Location ids are 7 digits and skip one id (void ids exist in the collection); each location has four
    seasonal acquisitions per product, S1 a few days from S2. The last location lacks its winter S1
    acquisition (a season without its partner). ``size`` is the 10 m patch size (264 in the collection;
    a multiple of 6 so that 60 m bands have whole pixels).

    Returns:
        Every GeoTIFF written.
    """
    if locations < 1 or seed < 0 or size % 6:
        raise ValueError(
            f"need locations >= 1, seed >= 0 and size a multiple of 6, got {locations}, {seed}, {size}"
        )
    out = Path(out_dir)
    written: list[Path] = []
    bands13 = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    for n in range(locations):
        loc = f"{2 * n:07d}"  # odd ids are void
        lrng = np.random.default_rng([seed, 11, n])
        crs = CRS.from_epsg(32600 + int(lrng.integers(1, 61)))
        x, y = float(lrng.uniform(200_000, 700_000)), float(lrng.uniform(1_000_000, 7_000_000))
        classes, ground, tex = _ground(lrng, size)
        for k, day in enumerate(_SEASON_DAYS):
            prng = np.random.default_rng([seed, 12, n, k])
            l1c, s1 = _sensors(prng, classes, ground, tex)
            date = f"2021{day}"
            s2_acq = f"{date}T103021_{date}T103406_T32TMT"
            s1_acq = (
                f"S1A_IW_GRDH_1SDV_{date[:6]}{int(date[6:]) + 2:02d}T054156_{date}T054221_032063_03B4B6_E6F0"
            )
            for product, bands in (("s2c", bands13), ("s2a", tuple(b for b in bands13 if b != "B10"))):
                for band in bands:
                    idx = bands13.index(band)
                    factor = _S2_RES_M[idx] // 10
                    gain = l2a_gain()[band] if product == "s2a" else 1.0
                    field = _block_mean(l1c[idx].astype(np.float64) * gain, factor)
                    data = np.clip(np.rint(field), 1, 65535).astype(np.uint16)
                    transform = Affine(_PIXEL_M * factor, 0.0, x, 0.0, -_PIXEL_M * factor, y)
                    path = out / product / loc / s2_acq / f"{band}.tif"
                    _write_tif(path, data[None], crs, transform)
                    written.append(path)
            if n == locations - 1 and k == 3:
                continue
            for c, pol in enumerate(("VV", "VH")):
                path = out / "s1" / loc / s1_acq / f"{pol}.tif"
                # S1 exported apart from S2, two pixels east of it (as in the collection, a few pixels)
                _write_tif(
                    path, s1[c : c + 1], crs, Affine(_PIXEL_M, 0.0, x + 2 * _PIXEL_M, 0.0, -_PIXEL_M, y)
                )
                written.append(path)
    return written
