"""Predicted land-cover GeoTIFFs open in GIS in colour (colour table, band description) and each scene's
patches open as one layer (a VRT per scene), read back with rasterio (GDAL)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import Affine

from eossl.eval.segment.data import label_scheme
from eossl.eval.segment.figures import class_colours, write_map_geotiff, write_scene_mosaics

CRS = "EPSG:32737"
X0, Y0, PIXEL = 500_000.0, 9_000_000.0, 10.0


def _transform(col: int, row: int) -> tuple[float, ...]:
    """A north-up 10 m grid; the patch's top-left pixel at (col, row) of the scene."""
    return (PIXEL, 0.0, X0 + col * PIXEL, 0.0, -PIXEL, Y0 - row * PIXEL)


def test_a_map_carries_its_colour_table_and_description(tmp_path):
    scheme = label_scheme("igbp_simple")
    pred = np.arange(64, dtype=np.uint8).reshape(8, 8) % len(scheme.classes)
    path = write_map_geotiff(tmp_path / "ROIs1158_spring_1_p0.tif", pred, scheme, CRS, _transform(0, 0))
    with rasterio.open(path) as ds:
        assert ds.colorinterp[0] == ColorInterp.palette  # QGIS renders it "paletted/unique values"
        table = ds.colormap(1)
        assert "igbp_simple" in ds.descriptions[0]
        data = ds.read(1)
    assert table[0][3] == 0  # nodata transparent
    for index, colour in enumerate(class_colours(scheme)):
        code = scheme.codes[index]
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        assert table[code] == (*rgb, 255)
        assert np.all(data[pred == index] == code)


def test_one_vrt_per_scene_mosaics_its_patches(tmp_path):
    scheme = label_scheme("igbp_simple")
    maps = tmp_path / "maps"
    # Scene 1: three 8 x 8 patches on a 4-pixel stride (overlapping by half, as SEN12MS's): class 1, 2, 3.
    placed = {
        "ROIs1158_spring_1_p0": (0, 0, 1),
        "ROIs1158_spring_1_p1": (4, 0, 2),
        "ROIs1158_spring_1_p2": (0, 4, 3),
    }
    for key, (col, row, cls) in placed.items():
        write_map_geotiff(
            maps / f"{key}.tif", np.full((8, 8), cls, np.uint8), scheme, CRS, _transform(col, row)
        )
    write_map_geotiff(
        maps / "ROIs1970_fall_9_p5.tif", np.zeros((8, 8), np.uint8), scheme, CRS, _transform(0, 0)
    )

    written = write_scene_mosaics(maps)
    assert [p.name for p in written] == ["ROIs1158_spring_1.vrt", "ROIs1970_fall_9.vrt"]
    with rasterio.open(written[0]) as ds:
        assert (ds.width, ds.height, ds.count) == (12, 12, 1)
        assert ds.crs.to_string() == CRS and ds.transform == Affine(*_transform(0, 0))
        assert ds.nodata == 0 and "igbp_simple" in ds.descriptions[0]
        assert (
            ds.colormap(1)[scheme.codes[2]]
            == rasterio.open(maps / "ROIs1158_spring_1_p0.tif").colormap(1)[scheme.codes[2]]
        )
        mosaic = ds.read(1)
    code = dict(enumerate(scheme.codes))
    assert np.all(mosaic[:4, :4] == code[1])  # only p0
    assert np.all(mosaic[:4, 8:] == code[2])  # only p1
    assert np.all(mosaic[4:8, 4:8] == code[3])  # p0, p1 and p2 overlap: the last file (p2) is on top
    assert np.all(mosaic[8:, 8:] == 0)  # no patch: nodata
    # The folder moves as a whole: the VRT names its patches relative to itself.
    moved = tmp_path / "moved"
    maps.rename(moved)
    with rasterio.open(moved / "ROIs1158_spring_1.vrt") as ds:
        assert np.array_equal(ds.read(1), mosaic)


def test_a_patch_off_the_scene_grid_is_refused_naming_it(tmp_path):
    scheme = label_scheme("igbp_simple")
    pred = np.ones((8, 8), np.uint8)
    write_map_geotiff(tmp_path / "ROIs1158_spring_1_p0.tif", pred, scheme, CRS, _transform(0, 0))
    shifted = (PIXEL, 0.0, X0 + 0.5 * PIXEL, 0.0, -PIXEL, Y0)
    write_map_geotiff(tmp_path / "ROIs1158_spring_1_p1.tif", pred, scheme, CRS, shifted)
    with pytest.raises(ValueError, match="ROIs1158_spring_1_p1.tif.*pixel grid"):
        write_scene_mosaics(tmp_path)


def test_maps_without_a_colour_table_still_mosaic(tmp_path):
    """Maps written before they carried colours: the VRT mosaics them in grey."""
    for patch, col in ((0, 0), (1, 4)):
        with rasterio.open(
            tmp_path / f"ROIs1158_spring_1_p{patch}.tif",
            "w",
            driver="GTiff",
            width=8,
            height=8,
            count=1,
            dtype="uint8",
            crs=CRS,
            transform=Affine(*_transform(col, 0)),
            nodata=0,
        ) as ds:
            ds.write(np.full((1, 8, 8), patch + 1, np.uint8))
    (vrt,) = write_scene_mosaics(tmp_path)
    with rasterio.open(vrt) as ds:
        assert ds.colorinterp[0] != ColorInterp.palette
        assert ds.read(1)[0].tolist() == [1] * 4 + [2] * 8
