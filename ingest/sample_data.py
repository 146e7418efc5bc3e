"""Synthetic SEN12MS trees of complete s1/s2/lc triplets, for the demo and for tests.

Why a generator when real patches exist: the few real patches in ``ingest/sample_patches`` are incomplete (no
patch there is a full triplet), and tests and the demo need many complete, overlapping patches in many
scenes. Exactness tests (reader, ingest, decoders) use the real files; everything that needs volume uses
this module.

Why it is not noise: a synthetic tree is only useful if a model can learn from it and if the software
meets the same structure as on real data. So

* one land-cover map per scene drives S1, S2 and LC of every patch cut from it: each class has an S2
  spectrum and an S1 backscatter, so the class can be learnt from either sensor, and overlapping
  patches of one scene (128 px stride, as in SEN12MS) show the same ground and agree exactly on LC;
* values are calibrated against the real patches (see the constants below): dB ranges and speckle of
  S1, L1C reflectance levels and band resolutions of S2, blocky 500 m MODIS labels with LCCS layers
  that follow the IGBP class;
* files, names, dtypes, band order, CRS and transforms follow SEN12MS exactly (uncompressed GeoTIFF,
  UTM per scene, 10 m pixels, scene numbers that repeat between season folders).

Output is a pure function of ``(patches, seed, seasons, patches_per_scene)``: the same arguments write
byte-identical files (no timestamps are written); every scene and patch draws from its own seeded
stream, so with the same ``seasons`` a scene does not change when more scenes are added after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage

from .bands import IGBP_TO_SIMPLE, LC, PATCH_SIZE, S1, S2

__all__ = ["PIXEL_SIZE_M", "SEASON_FOLDERS", "STRIDE", "write_sample_data"]

# SEN12MS ROI/season folders in season order; ``seasons=k`` uses the first k.
SEASON_FOLDERS: tuple[str, ...] = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
PIXEL_SIZE_M = 10.0
# SEN12MS cuts patches every 128 px, so neighbouring patches overlap by half.
STRIDE = PATCH_SIZE // 2

# --- calibration -------------------------------------------------------------------------------------
# Measured from the real patches in ingest/sample_patches (SEN12MS, CC-BY-4.0) with rasterio:
#   S1 p30 (ROIs1158_spring, EPSG:32737) over its own LC: VV/VH dB mean per IGBP class
#     4: -9.4/-15.5, 5: -9.9/-15.9, 8: -10.5/-16.3, 9: -10.8/-16.6; within-class VV std 1.6-1.95 dB;
#     lag-1 autocorrelation 0.79 (VV) / 0.79 (VH), lag-4 0.17.
#   S1 p839 (ROIs1970_fall, EPSG:32650): VV -27.6..0.0 (58 px exactly 0: clipped at 0 dB), mean -11.5;
#     VH -34.6..-3.8, mean -17.9; dark water-like pixels VV -17.9 / VH -24.0; lag-1 autocorr. 0.90.
#   S2 p839 band means B1..B12: 1599 1349 1213 1258 1422 1619 1758 1777 1936 1075 30 1750 1261;
#     lag-1 autocorrelation: 10 m bands 0.89-0.95, 20 m bands 0.96-0.97, 60 m bands 0.98-0.99.
#   LC p30: uint8, IGBP {4, 5, 8, 9} -> LCCS-LC {14, 16, 21, 22}, LCCS-LU and LCCS-SH {10, 10, 20, 20};
#     regions are ~46 px (463 m MODIS cells) parallelogram blocks, slightly rotated against UTM.
# Per-class S2 spectra cannot be measured from one unlabelled S2 patch: they are typical L1C top-of-
# atmosphere spectra (haze lifts B1/B2 for every class, B9 ~ half of B8A, cirrus B10 ~ 10-60) scaled so
# that vegetated/mixed classes sit at the levels measured in p839.

# gamma shape before smoothing; with _S1_PSF_PX this gives a within-class VV std of 1.7-2.0 dB and a
# lag-1 autocorrelation of ~0.85, as measured above (equivalent number of looks ~5)
_S1_LOOKS = 0.6
_S1_PSF_PX = 1.0  # GRD resolution cell (~20 m) spans ~2 px at 10 m spacing: speckle is correlated
_S2_PSF_PX = {10: 0.5, 20: 1.0, 60: 2.5}  # Gaussian blur by native band resolution (m)
_S2_RES_M = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20)  # B1..B12 with B8A, SEN12MS order
# How vegetation vigour moves each band: NIR up, red and SWIR down (relative to the class spectrum).
_VIGOUR_LOADING = np.array([0, 0, 0.2, -0.6, 0.2, 0.8, 1, 1, 1, 0.5, 0, -0.4, -0.6], dtype=np.float32)
# Season factor on vigour-driven bands of vegetated classes (spring, summer, fall, winter).
_SEASON_VIGOUR = (1.0, 1.08, 0.92, 0.85)
_MODIS_CELL_PX = 46.3  # MCD12Q1 500 m product: 463.3 m sinusoidal cells
_PARCEL_CELL_PX = 24.0  # field / city-block size of the parcel texture


@dataclass(frozen=True)
class _ClassSpec:
    """Signatures of one IGBP class.

    Attributes:
        s2: mean L1C reflectance x 10000 per S2 band (SEN12MS order).
        s1_db: mean VV and VH backscatter in dB.
        lccs: (LCCS-LC, LCCS-LU, LCCS-SH) MODIS codes paired with this IGBP class.
        texture: relative amplitudes of (brightness, vigour, parcel) texture in S2 and S1 texture std (dB).
        partners: IGBP classes that plausibly share a scene with this one.
    """

    s2: tuple[int, ...]
    s1_db: tuple[float, float]
    lccs: tuple[int, int, int]
    texture: tuple[float, float, float, float]
    partners: tuple[int, ...]


# fmt: off
_CLASSES: dict[int, _ClassSpec] = {
    # B1    B2    B3    B4    B5    B6    B7    B8   B8A    B9  B10   B11   B12
    4: _ClassSpec((1450, 1150, 1000, 750, 1150, 2200, 2650, 2750, 2950, 1450, 20, 1700, 850),
                  (-9.4, -15.5), (14, 10, 10), (0.06, 0.08, 0.0, 0.6), (5, 8, 12, 17)),
    5: _ClassSpec((1400, 1100, 950, 700, 1050, 1900, 2300, 2400, 2550, 1250, 18, 1450, 720),
                  (-9.9, -15.9), (16, 10, 10), (0.06, 0.08, 0.0, 0.6), (4, 8, 9, 14)),
    7: _ClassSpec((1650, 1450, 1500, 1650, 1900, 2150, 2300, 2350, 2500, 1250, 28, 2900, 2250),
                  (-12.5, -19.5), (43, 40, 40), (0.08, 0.06, 0.0, 1.0), (16, 10, 9)),
    8: _ClassSpec((1500, 1250, 1150, 1000, 1400, 2000, 2350, 2450, 2600, 1300, 22, 2100, 1300),
                  (-10.5, -16.3), (21, 20, 20), (0.07, 0.10, 0.0, 0.8), (9, 5, 10)),
    9: _ClassSpec((1550, 1300, 1250, 1250, 1600, 2050, 2350, 2400, 2600, 1300, 25, 2600, 1800),
                  (-10.8, -16.6), (22, 20, 20), (0.07, 0.10, 0.0, 0.8), (8, 10, 12, 7)),
    10: _ClassSpec((1500, 1250, 1200, 1050, 1500, 2300, 2700, 2800, 3000, 1500, 22, 2400, 1500),
                   (-11.5, -18.5), (31, 30, 30), (0.06, 0.10, 0.0, 0.7), (12, 9, 7, 17)),
    11: _ClassSpec((1450, 1150, 1050, 850, 1100, 1500, 1700, 1750, 1850, 900, 18, 1200, 700),
                   (-9.5, -17.0), (31, 30, 50), (0.08, 0.15, 0.0, 1.5), (17, 10, 12)),
    12: _ClassSpec((1550, 1300, 1250, 1150, 1550, 2450, 2950, 3050, 3250, 1600, 25, 2300, 1400),
                   (-10.5, -17.0), (31, 36, 30), (0.08, 0.20, 0.15, 1.5), (14, 13, 10, 17)),
    13: _ClassSpec((1750, 1600, 1550, 1600, 1700, 1850, 1950, 2000, 2100, 1050, 35, 2300, 2000),
                   (-4.5, -11.5), (1, 9, 1), (0.15, 0.05, 0.15, 3.0), (12, 14, 17, 10)),
    14: _ClassSpec((1500, 1250, 1150, 1000, 1400, 2250, 2700, 2800, 3000, 1500, 22, 2100, 1200),
                   (-10.0, -16.5), (31, 35, 30), (0.08, 0.15, 0.10, 1.2), (12, 5, 10)),
    15: _ClassSpec((5600, 5700, 5500, 5300, 5200, 5000, 4850, 4750, 4600, 2300, 60, 900, 700),
                   (-13.0, -21.0), (2, 2, 2), (0.04, 0.0, 0.0, 1.0), (16, 17, 10)),
    16: _ClassSpec((1800, 1700, 1850, 2150, 2400, 2600, 2750, 2800, 2950, 1450, 30, 3800, 3200),
                   (-15.0, -24.0), (1, 1, 1), (0.08, 0.0, 0.0, 1.0), (7, 15, 10)),
    17: _ClassSpec((1350, 1100, 950, 700, 550, 420, 380, 340, 310, 160, 12, 170, 120),
                   (-20.0, -27.0), (3, 3, 3), (0.05, 0.0, 0.0, 1.0), (11, 12, 13, 4)),
}
# fmt: on
_IGBP_CODES = tuple(_CLASSES)
_VEGETATED = {4, 5, 7, 8, 9, 10, 11, 12, 14}
_LCCS_LUT = np.zeros((256, 3), dtype=np.uint8)
for _code, _spec in _CLASSES.items():
    _LCCS_LUT[_code] = _spec.lccs


@dataclass(frozen=True)
class _Scene:
    """Where one scene goes (folder, number, season) and how many patches are cut from it."""

    index: int  # global scene index, seeds the scene's random stream
    folder: str
    number: int
    season: int  # index into SEASON_FOLDERS
    count: int  # patches cut from this scene


def _plan(patches: int, seasons: int, patches_per_scene: int) -> list[_Scene]:
    """Scenes round-robin over the season folders; scene numbers count 1, 2, ... inside each folder."""
    scenes = []
    for k in range(math.ceil(patches / patches_per_scene)):
        n = min(patches_per_scene, patches - k * patches_per_scene)
        season = k % seasons
        scenes.append(_Scene(k, SEASON_FOLDERS[season], k // seasons + 1, season, n))
    return scenes


def _smooth_fields(
    rng: np.random.Generator, shape: tuple[int, int], scales: list[dict[float, float]]
) -> np.ndarray:
    """Unit-std Gaussian random fields, one per entry of ``scales`` ({sigma_px: weight}), via one FFT."""
    h, w = shape
    white = rng.standard_normal((len(scales), h, w), dtype=np.float32)
    spec = np.fft.rfft2(white)
    k2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2
    filt = np.stack(
        [sum(wt * np.exp(-2 * np.pi**2 * s**2 * k2) * s for s, wt in sc.items()) for sc in scales]
    )
    fields = np.fft.irfft2(spec * filt, s=shape).astype(np.float32)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields


def _rotated_grid(
    shape: tuple[int, int], cell: float, theta: float, margin: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) in cells of a grid rotated by ``theta``, shifted to start at ``margin``."""
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    u = (r * math.cos(theta) + c * math.sin(theta)) / cell
    v = (c * math.cos(theta) - r * math.sin(theta)) / cell
    return u - u.min() + margin, v - v.min() + margin


def _scene_maps(
    rng: np.random.Generator, shape: tuple[int, int], classes: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Land cover of one scene extent.

    Returns ``(lc, ground)``: ``lc`` the blocky MODIS-like IGBP map (class index per pixel, constant
    on rotated 463 m cells), ``ground`` the class index that S1/S2 see (the same class scores
    interpolated smoothly, with ragged borders), so the 10 m imagery agrees with LC inside blocks.
    """
    u, v = _rotated_grid(shape, _MODIS_CELL_PX, float(rng.uniform(-0.1, 0.1)))
    coarse_shape = (int(u.max()) + 3, int(v.max()) + 3)
    # class scores on the MODIS grid: smooth over ~1.5 cells, dominant class biased up
    scores = _smooth_fields(rng, coarse_shape, [{1.5: 1.0}] * len(classes)) + bias[:, None, None]
    lc = scores.argmax(axis=0)[u.astype(np.intp), v.astype(np.intp)]
    fine = _smooth_fields(rng, shape, [{6.0: 1.0}] * len(classes))
    ground = np.stack(
        [ndimage.map_coordinates(s, [u - 0.5, v - 0.5], order=1, mode="nearest") for s in scores]
    )
    ground = (ground + 0.15 * fine).argmax(axis=0)
    return lc.astype(np.uint8), ground.astype(np.uint8)


def _s2_patch(
    rng: np.random.Generator,
    ground: np.ndarray,
    tex: np.ndarray,
    scene_s2: np.ndarray,
    scene_tex: np.ndarray,
    gain: float,
) -> np.ndarray:
    """S2 reflectance (13, H, W) uint16: class spectrum x texture, sensor noise, band-resolution blur.

    ``ground`` (H, W) indexes the scene's classes, ``tex`` (4, H, W) holds the scene textures cut to
    the patch, ``scene_s2`` (K, 13) and ``scene_tex`` (K, 4) the per-class spectra and amplitudes.
    """
    bright, vigour, parcel = tex[0], tex[1], tex[2]
    t = scene_tex[ground]  # (H, W, 4) texture amplitudes of the class under each pixel
    rel = t[..., 0] * bright + t[..., 2] * parcel  # (H, W)
    vig = t[..., 1] * vigour
    refl = scene_s2[ground] * (1 + rel[..., None] + vig[..., None] * _VIGOUR_LOADING)  # (H, W, 13)
    refl = np.moveaxis(refl, -1, 0) * gain  # (13, H, W)
    # sensor noise before the blur: it lives at each band's native resolution, as in resampled L1C
    refl += rng.standard_normal(refl.shape, dtype=np.float32) * (0.01 * refl + 3)
    for res, sigma in _S2_PSF_PX.items():
        idx = [i for i, r in enumerate(_S2_RES_M) if r == res]
        refl[idx] = ndimage.gaussian_filter(refl[idx], sigma=(0, sigma, sigma), mode="reflect")
    return np.clip(np.rint(refl), 1, 65535).astype(np.uint16)


def _s1_patch(
    rng: np.random.Generator, ground: np.ndarray, tex: np.ndarray, scene_s1: np.ndarray, scene_tex: np.ndarray
) -> np.ndarray:
    """S1 backscatter (2, H, W) float32 dB: class mean + texture, gamma speckle in linear power."""
    db = scene_s1[ground] + (scene_tex[ground][..., 3] * tex[3])[..., None]  # (H, W, 2)
    lin = 10 ** (np.moveaxis(db, -1, 0) / 10)
    speckle = rng.gamma(_S1_LOOKS, 1 / _S1_LOOKS, size=lin.shape).astype(np.float32)
    speckle = ndimage.gaussian_filter(speckle, sigma=(0, _S1_PSF_PX, _S1_PSF_PX), mode="reflect")
    out = 10 * np.log10(np.maximum(lin * speckle, 1e-6))
    return np.minimum(out, 0.0).astype(np.float32)  # SEN12MS clips at 0 dB


def _write_tif(path: Path, array: np.ndarray, crs: CRS, transform: Affine) -> None:
    """Uncompressed, strip-organised, pixel-interleaved GeoTIFF like SEN12MS; no timestamp tags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=array.shape[2],
        height=array.shape[1],
        count=array.shape[0],
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        interleave="pixel",
        tiled=False,
    ) as dst:
        dst.write(array)


def _write_scene(out: Path, scene: _Scene, seed: int, dominant: int) -> list[Path]:
    """Generate one scene's land cover and textures, cut its patches and write their triplets."""
    rng = np.random.default_rng([seed, 1, scene.index])
    # UTM grid of the scene; patch p (1-based) sits at row (p-1)//ncols, col (p-1)%ncols.
    south = bool(rng.random() < 0.3)
    crs = CRS.from_epsg((32700 if south else 32600) + int(rng.integers(1, 61)))
    x0 = float(rng.uniform(200_000, 700_000))
    y0 = float(rng.uniform(1_500_000, 9_000_000) if south else rng.uniform(500_000, 7_500_000))
    ncols = int(rng.integers(5, 10))
    first = int(rng.integers(0, 3 * ncols))
    numbers = [first + 1 + j for j in range(scene.count)]
    rows = [(p - 1) // ncols for p in numbers]
    cols = [(p - 1) % ncols for p in numbers]
    r0, c0 = min(rows), min(cols)
    shape = ((max(rows) - r0) * STRIDE + PATCH_SIZE, (max(cols) - c0) * STRIDE + PATCH_SIZE)

    # classes present: the dominant one plus 1-3 plausible partners, dominant biased up
    partners = list(_CLASSES[dominant].partners)
    extra = rng.choice(partners, size=int(rng.integers(1, min(3, len(partners)) + 1)), replace=False)
    classes = np.array([dominant, *sorted(int(c) for c in extra)], dtype=np.uint8)
    bias = np.concatenate([[0.9], rng.uniform(-0.4, 0.1, len(classes) - 1)]).astype(np.float32)
    lc_idx, ground_idx = _scene_maps(rng, shape, classes, bias)

    # scene textures: brightness (multi-scale), vigour, parcels (piecewise constant), S1 texture
    bright, vigour, s1_tex = _smooth_fields(
        rng, shape, [{0.7: 0.8, 4.0: 0.6, 16.0: 1.0}, {3.0: 0.5, 12.0: 1.0}, {1.0: 0.6, 5.0: 1.0}]
    )
    pu, pv = _rotated_grid(shape, _PARCEL_CELL_PX, float(rng.uniform(-0.6, 0.6)))
    cells = rng.uniform(-1.7, 1.7, size=(int(pu.max()) + 3, int(pv.max()) + 3)).astype(np.float32)
    parcel = cells[pu.astype(np.intp), pv.astype(np.intp)]  # piecewise constant fields / blocks
    tex = np.stack([bright, vigour, parcel, s1_tex])  # (4, H, W), matches _ClassSpec.texture
    season_factor = np.where(_VIGOUR_LOADING > 0, _SEASON_VIGOUR[scene.season], 1.0)
    scene_s2 = np.array(
        [np.array(_CLASSES[c].s2) * (season_factor if c in _VEGETATED else 1.0) for c in classes],
        dtype=np.float32,
    )
    scene_s2[:, :3] += rng.uniform(0, 200)  # haze of the acquisition lifts the blue bands
    scene_s1 = np.array([_CLASSES[c].s1_db for c in classes], dtype=np.float32)
    scene_tex = np.array([_CLASSES[c].texture for c in classes], dtype=np.float32)
    gain = np.float32(rng.normal(1.0, 0.04))

    written = []
    for j, (p, row, col) in enumerate(zip(numbers, rows, cols, strict=True)):
        prng = np.random.default_rng([seed, 2, scene.index, j])
        win = (
            slice((row - r0) * STRIDE, (row - r0) * STRIDE + PATCH_SIZE),
            slice((col - c0) * STRIDE, (col - c0) * STRIDE + PATCH_SIZE),
        )
        ground = ground_idx[win]
        ptex = tex[(slice(None), *win)]
        igbp = classes[lc_idx[win]]
        arrays = {
            S1.name: _s1_patch(prng, ground, ptex, scene_s1, scene_tex),
            S2.name: _s2_patch(prng, ground, ptex, scene_s2, scene_tex, gain),
            LC.name: np.concatenate([igbp[None], np.moveaxis(_LCCS_LUT[igbp], -1, 0)]),
        }
        x, y = x0 + col * STRIDE * PIXEL_SIZE_M, y0 - row * STRIDE * PIXEL_SIZE_M
        transform = Affine(PIXEL_SIZE_M, 0.0, x, 0.0, -PIXEL_SIZE_M, y)  # north-up, upper-left corner
        for mod in (S1, S2, LC):
            stem = f"{scene.folder}_{mod.name}_{scene.number}"
            path = out / scene.folder / f"{mod.name}_{scene.number}" / f"{stem}_p{p}.tif"
            assert arrays[mod.name].shape == mod.shape_chw and arrays[mod.name].dtype == np.dtype(mod.dtype)
            _write_tif(path, arrays[mod.name], crs, transform)
            written.append(path)
    return written


def write_sample_data(
    out_dir: str | Path,
    patches: int = 32,
    seed: int = 0,
    *,
    seasons: int | None = None,
    patches_per_scene: int = 4,
) -> list[Path]:
    """Write a synthetic SEN12MS tree of ``patches`` complete s1/s2/lc triplets under ``out_dir``.

    Layout and names are exactly SEN12MS's:
    ``ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif``. Scenes take ``patches_per_scene``
    consecutive patch numbers of their grid (the last scene may have fewer), so neighbouring patches
    overlap by 128 px and agree on land cover there. Scenes go round-robin over the season folders.

    Args:
        out_dir: folder to write into (created; existing files of the same name are overwritten).
        patches: number of complete triplets to write (>= 1).
        seed: non-negative seed; the same arguments write byte-identical files.
        seasons: how many season folders to use (1..4); default all four, or fewer when there are
            fewer scenes than that.
        patches_per_scene: patches cut from each scene (>= 1); more means more overlap.

    Returns:
        The written files, per patch in the order s1, s2, lc, scenes in generation order.
    """
    if patches < 1:
        raise ValueError(f"patches must be >= 1, got {patches}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if patches_per_scene < 1:
        raise ValueError(f"patches_per_scene must be >= 1, got {patches_per_scene}")
    if seasons is not None and not 1 <= seasons <= len(SEASON_FOLDERS):
        raise ValueError(f"seasons must be in 1..{len(SEASON_FOLDERS)}, got {seasons}")
    n_scenes = math.ceil(patches / patches_per_scene)
    n_seasons = min(seasons or len(SEASON_FOLDERS), n_scenes)
    # dominant classes: a seeded permutation of the 10 simplified classes, cycled, each time with one of
    # its IGBP codes: scenes 1-10, 11-20, ... each cover all 10 simplified classes as dominant class
    plan_rng = np.random.default_rng([seed, 0])
    simple_order = plan_rng.permutation(sorted(set(IGBP_TO_SIMPLE[c] for c in _IGBP_CODES)))
    out = Path(out_dir)
    written: list[Path] = []
    for scene in _plan(patches, n_seasons, patches_per_scene):
        simple = simple_order[scene.index % len(simple_order)]
        dominant = int(plan_rng.choice([c for c in _IGBP_CODES if IGBP_TO_SIMPLE[c] == simple]))
        written += _write_scene(out, scene, seed, dominant)
    return written
