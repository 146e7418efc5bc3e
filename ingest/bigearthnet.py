"""BigEarthNet-MM (v1.0) as an ingest source: S1/S2 patch folders, 19-class CORINE multi-labels.

Layout (as extracted from ``BigEarthNet-S2-v1.0.tar.gz`` and ``BigEarthNet-S1-v1.0.tar.gz``, at any
depth under the source folder):

- one folder per Sentinel-2 patch, ``S2A_MSIL2A_20170613T101031_0_45/``, holding one GeoTIFF per band
  (``<name>_B01.tif`` ... ``_B09.tif``, ``_B8A.tif``, ``_B11.tif``, ``_B12.tif``; no B10 in L2A) at the
  band's native resolution (120 x 120 px at 10 m, 60 x 60 at 20 m, 20 x 20 at 60 m; uint16 L2A surface
  reflectance x 10000) and ``<name>_labels_metadata.json`` (``labels``, ``coordinates``, ``projection``,
  ``tile_source``, ``acquisition_date``);
- one folder per Sentinel-1 patch, ``S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39/``, holding
  ``<name>_VV.tif`` and ``<name>_VH.tif`` (120 x 120 px, float32 backscatter in dB) and
  ``<name>_labels_metadata.json`` whose ``corresponding_s2_patch`` names its S2 patch.

A sample is an S2 patch and the S1 patch that references it; its key is the S2 patch name and its
scene (the unit a split keeps on one side) is the S2 product the patch was cut from, so neighbouring
patches never straddle the split. Labels are the patch's CORINE 2018 labels (43-class nomenclature)
mapped to the 19-class nomenclature of Sumbul et al. (2021), multi-label. The patches the dataset's
authors list as covered by seasonal snow or by clouds and cloud shadows (``patches_with_seasonal_
snow.csv``, ``patches_with_cloud_and_shadow.csv``) are rejected with that reason when the lists are
given (``eossl ingest --reject-list``).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import ClassVar

import fsspec

from .band_source import BandFileSource
from .bands import S1, S2
from .layout import PatchGroup, SampleId, SourceListing, list_source_files

__all__ = [
    "BEN19_CLASSES",
    "BEN_S1",
    "BEN_S2",
    "BIGEARTHNET_SOURCE",
    "CORINE_LABELS",
    "CORINE_TO_BEN19",
    "BenLabels",
    "ben19_codes",
]

PATCH_PX = 120
_METADATA_READERS = 16  # concurrent reads of S1 metadata files while listing

# S2's band table (bands.S2) without B10, on the 120 px patch; int16 re-exports are accepted when no
# value is negative. As for L1C, 0 is no data and real surface reflectance stays below 2.0 (20,000)
# outside saturated clouds, which the dataset's cloud list removes: S2's valid range holds.
BEN_S2 = replace(
    S2,
    bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
    accepted_dtypes=("uint16", "int16"),
    unit="Sentinel-2 L2A (Sen2Cor) bottom-of-atmosphere reflectance x 10000, no B10",
    size=PATCH_PX,
)
BEN_S1 = replace(
    S1,
    unit="backscatter sigma0 in dB (BigEarthNet-S1 v1.0: IW GRD, terrain corrected, unclipped)",
    size=PATCH_PX,
)
# File suffix of each band of the table (BigEarthNet writes two-digit band numbers).
_S2_FILE_BAND = {b: (f"B{int(b[1:]):02d}" if b[1:].isdigit() else b) for b in BEN_S2.bands}
assert set(BEN_S2.bands) <= set(S2.bands)

# The 43 CORINE Land Cover level-3 labels as BigEarthNet v1.0's metadata spells them.
CORINE_LABELS: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

# The 19-class nomenclature (Sumbul et al. 2021, "BigEarthNet-MM", Table 1); code i+1 is BEN19_CLASSES[i].
BEN19_CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# CORINE label -> 19-class code (1-based). The ten labels absent here have no class in the 19-class
# nomenclature (roads, ports, airports, mines, dumps, construction sites, green urban areas, sport and
# leisure, bare rock, burnt areas, intertidal flats: too rare or not identifiable at 10 m); a patch keeps
# its other labels.
CORINE_TO_BEN19: dict[str, int] = {
    "Continuous urban fabric": 1,
    "Discontinuous urban fabric": 1,
    "Industrial or commercial units": 2,
    "Non-irrigated arable land": 3,
    "Permanently irrigated land": 3,
    "Rice fields": 3,
    "Vineyards": 4,
    "Fruit trees and berry plantations": 4,
    "Olive groves": 4,
    "Annual crops associated with permanent crops": 4,
    "Pastures": 5,
    "Complex cultivation patterns": 6,
    "Land principally occupied by agriculture, with significant areas of natural vegetation": 7,
    "Agro-forestry areas": 8,
    "Broad-leaved forest": 9,
    "Coniferous forest": 10,
    "Mixed forest": 11,
    "Natural grassland": 12,
    "Sparsely vegetated areas": 12,
    "Moors and heathland": 13,
    "Sclerophyllous vegetation": 13,
    "Transitional woodland/shrub": 14,
    "Beaches, dunes, sands": 15,
    "Inland marshes": 16,
    "Peatbogs": 16,
    "Salt marshes": 17,
    "Salines": 17,
    "Water courses": 18,
    "Water bodies": 18,
    "Coastal lagoons": 19,
    "Estuaries": 19,
    "Sea and ocean": 19,
}
assert set(CORINE_TO_BEN19) <= set(CORINE_LABELS) and len(CORINE_LABELS) == 43
assert sorted(set(CORINE_TO_BEN19.values())) == list(range(1, 20))


def ben19_codes(labels: list[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(sorted 19-class codes, CORINE labels without a 19-class counterpart) of a patch's labels.

    Raises:
        ValueError: a label that is not one of the 43 CORINE labels (misspelt or another nomenclature).
    """
    unknown = [lab for lab in labels if lab not in CORINE_LABELS]
    if unknown:
        raise ValueError(f"unknown CORINE label(s) {unknown}")
    codes = sorted({CORINE_TO_BEN19[lab] for lab in labels if lab in CORINE_TO_BEN19})
    return tuple(codes), tuple(lab for lab in labels if lab not in CORINE_TO_BEN19)


@dataclass(frozen=True)
class BenLabels:
    """A patch's labels: the 19-class codes (1-based) and the CORINE labels they come from."""

    ben19: tuple[int, ...]
    corine: tuple[str, ...]
    unmapped: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "bigearthnet19_multi": list(self.ben19),
            "corine": list(self.corine),
            "unmapped": list(self.unmapped),
        }


# S2A_MSIL2A_20170613T101031_0_45 (v1.0); the product part may carry more fields (reBEN's
# S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57).
_S2_NAME = r"S2[AB]_MSIL2A_(?P<date>\d{8})T\d{6}(?:_[A-Z0-9]+)*?_(?P<row>\d+)_(?P<col>\d+)"
_S2_FILE = re.compile(rf"^(?P<name>{_S2_NAME})_(?:(?P<band>B0[1-9]|B1[0-2]|B8A)\.tif|labels_metadata\.json)$")
# S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39 (v1.0 and reBEN alike)
_S1_NAME = r"S1[AB]_IW_GRDH_[A-Z0-9]+_\d{8}T\d{6}(?:_[A-Z0-9]+)*?_\d+_\d+"
_S1_FILE = re.compile(rf"^(?P<name>{_S1_NAME})_(?:(?P<pol>VV|VH)\.tif|labels_metadata\.json)$")
_SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring"}
_SEASONS |= {6: "summer", 7: "summer", 8: "summer", 9: "fall", 10: "fall", 11: "fall"}


def _s2_identity(name: str) -> SampleId:
    m = re.fullmatch(_S2_NAME, name)
    assert m is not None
    product = name[: -len(f"_{m['row']}_{m['col']}")]
    return SampleId(
        scene_id=product,
        key=name,
        fields=(
            ("product", product),
            ("season", _SEASONS[int(m["date"][4:6])]),
            ("row", int(m["row"])),
            ("col", int(m["col"])),
        ),
    )


@dataclass(frozen=True)
class _BigEarthNet(BandFileSource):
    samples_noun: ClassVar[str] = "BigEarthNet-MM patches"

    def scan(self, url: str, storage_options: dict | None = None) -> SourceListing:
        s2: dict[str, dict[str, list[str]]] = {}
        s1: dict[str, dict[str, list[str]]] = {}
        ignored: list[str] = []
        for full in list_source_files(url, storage_options):
            name = full.rsplit("/", 1)[-1]
            if m := _S2_FILE.match(name):
                s2.setdefault(m["name"], {}).setdefault(f"s2:{m['band'] or 'meta'}", []).append(full)
            elif m := _S1_FILE.match(name):
                s1.setdefault(m["name"], {}).setdefault(f"s1:{m['pol'] or 'meta'}", []).append(full)
            else:
                ignored.append(full)
        groups = {name: PatchGroup(_s2_identity(name), dict(files)) for name, files in s2.items()}
        # One small JSON per S1 patch names its S2 patch (590k of them): read concurrently, since each
        # read is latency (a file open, or a GET on object storage), then used in listing order.
        with ThreadPoolExecutor(max_workers=_METADATA_READERS) as pool:
            partners = list(pool.map(_s1_partner, s1.values()))
        for (s1_name, files), (partner, reason) in zip(s1.items(), partners, strict=True):
            if partner is None:
                # An S1 patch that names no (valid) S2 patch is a sample of its own, refused with why.
                pid = SampleId(scene_id=s1_name, key=s1_name, fields=(("s1_patch", s1_name),))
                groups[s1_name] = PatchGroup(pid, dict(files), reject_reason=reason)
                continue
            group = groups.setdefault(partner, PatchGroup(_s2_identity(partner), {}))
            for k, paths in files.items():
                group.files.setdefault(k, []).extend(paths)
        ordered = sorted(groups.values(), key=lambda g: (g.pid.scene_id, g.pid.key))
        return SourceListing(source=url, groups=ordered, ignored=ignored)

    def file_band(self, mod: str, band: str) -> str:
        return _S2_FILE_BAND[band] if mod == "s2" else band

    def labels(self, group: PatchGroup, errors: list[dict[str, str]]) -> BenLabels | None:
        """The patch's labels from its ``_labels_metadata.json`` (the S2 patch's, else the S1 patch's)."""
        meta = group.files.get("s2:meta") or group.files.get("s1:meta")
        if meta is None:
            errors.append({"file": group.key, "reason": "no _labels_metadata.json"})
            return None
        try:
            doc = _load_json(meta[0])
            codes, unmapped = ben19_codes(list(doc["labels"]))
            return BenLabels(codes, tuple(doc["labels"]), unmapped)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            errors.append({"file": meta[0], "reason": f"unusable labels metadata: {exc}"})
            return None

    def recognises(self, paths: list[str]) -> bool:
        from .reben import TABLE_FILES  # noqa: PLC0415 - reben builds on this module

        # reBEN (v2.0) names its patches alike; its metadata table at the top tells the trees apart.
        if any(p in TABLE_FILES for p in paths):
            return False
        names = [p.rsplit("/", 1)[-1] for p in paths]
        return any(_S2_FILE.match(n) or _S1_FILE.match(n) for n in names)


def _load_json(path: str) -> dict:
    with fsspec.open(path, "rb") as f:
        doc = json.loads(f.read())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _s1_partner(files: dict[str, list[str]]) -> tuple[str | None, str]:
    """The S2 patch an S1 patch's metadata names, or (None, why not)."""
    meta = files.get("s1:meta")
    if not meta:
        return None, "S1 patch without _labels_metadata.json: its S2 patch is unknown"
    try:
        doc = _load_json(meta[0])
        partner = doc["corresponding_s2_patch"]
    except (OSError, ValueError, KeyError) as exc:
        return None, f"{meta[0]}: cannot read corresponding_s2_patch: {exc}"
    if not isinstance(partner, str) or re.fullmatch(_S2_NAME, partner) is None:
        return None, f"{meta[0]}: corresponding_s2_patch {partner!r} is not an S2 patch name"
    return partner, ""


BIGEARTHNET_SOURCE = _BigEarthNet(
    name="bigearthnet-mm",
    title="BigEarthNet-MM",
    expected=(
        "S2 patch folders <S2 name>/<S2 name>_B01.tif ... _B12.tif + _labels_metadata.json and S1 patch "
        "folders <S1 name>/<S1 name>_VV.tif, _VH.tif + _labels_metadata.json (v1.0)"
    ),
    modalities={"s1": BEN_S1, "s2": BEN_S2},
    label_schemes={"bigearthnet19": BEN19_CLASSES},
    id_fields={"product": "str", "season": "str", "row": "int", "col": "int"},
    # The S1 patches were cut to the S2 patches' footprints from separately terrain-corrected scenes:
    # corners within half a 10 m pixel are the same grid cell (each sample records both grids).
    grid_tolerance_m=5.0,
)
