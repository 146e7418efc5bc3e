"""SSL4EO-S12 as an ingest source: four seasons of S1 GRD and S2 L1C per location, no labels.

Layout (as extracted from its archives):
``s1/<location>/<acquisition>/{VV,VH}.tif`` (float32 dB), ``s2c/<location>/<acquisition>/B1.tif ...
B12.tif`` (L1C, 13 bands incl. B8A and B10, uint16) and ``s2a/...`` (L2A, 12 bands); ``<location>`` is
a 7-digit id (some ids are void), ``<acquisition>`` the product's id, which starts with (S2) or
contains (S1) its acquisition date ``YYYYMMDDTHHMMSS``. Patches are 264 x 264 px at 10 m; S2 bands are
stored at their native resolutions (132 px at 20 m, 44 px at 60 m) and brought onto the 10 m grid by
``bandfiles.read_modality`` (nearest neighbour, exact).

Pairing rule: within a location, S1 and S2 acquisitions are matched one to one by closest acquisition
date (pairs taken in order of increasing date difference), which pairs the acquisitions of the same
season, since the collection draws one acquisition per season and location. Each pair is one sample,
keyed ``<location>_<k>`` where k ranks the pair's S2 date within the location (0 = earliest); an
acquisition left without a partner is a sample with one modality (rejected when that modality is
required, as by default). The scene of every sample is its location, so the four seasons of a
location always fall in the same split (no leakage between seasons).

Georeference: S1 and S2 of a location were exported separately, and the collection's S1 is known to
be offset from S2 by a few pixels; a sample's georeference is its S2 grid, and the JSON member records
each modality's own grid (``grids``) rather than refusing the pair.

The S2 modality is the L1C product (``s2c``, ``--source-format ssl4eo-s12``), whose band table is
SEN12MS's, or the L2A product (``s2a``, ``--source-format ssl4eo-s12-l2a``, 12 bands without B10); the
other product's files are listed as ignored. A dataset holds one S2 product, so that its statistics and
band table describe one kind of reflectance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar

from .band_source import BandFileSource
from .bands import S1, S2
from .layout import PatchGroup, SampleId, SourceListing, list_source_files

__all__ = ["SSL4EO_L2A_SOURCE", "SSL4EO_S1", "SSL4EO_S2", "SSL4EO_S2_L2A", "SSL4EO_SOURCE", "pair_seasons"]

PATCH_PX = 264

# SEN12MS's band tables (bands.S1, bands.S2) on the 264 px patch.
SSL4EO_S2 = replace(
    S2, unit="Sentinel-2 L1C top-of-atmosphere reflectance x 10000 (SSL4EO-S12 s2c)", size=PATCH_PX
)
SSL4EO_S2_L2A = replace(
    SSL4EO_S2,
    bands=tuple(b for b in S2.bands if b != "B10"),
    unit="Sentinel-2 L2A bottom-of-atmosphere reflectance x 10000 (SSL4EO-S12 s2a), no B10",
)
SSL4EO_S1 = replace(
    S1, unit="backscatter sigma0 in dB (SSL4EO-S12 s1: IW GRD, terrain corrected)", size=PATCH_PX
)

_FILE = re.compile(r"(?:^|/)(?P<product>s1|s2c|s2a)/(?P<loc>\d{7})/(?P<acq>[^/]+)/(?P<band>[^/]+)\.tif$")
_DATE = re.compile(r"(\d{8}T\d{6})")


def _date(acquisition: str) -> datetime | None:
    m = _DATE.search(acquisition)
    return datetime.strptime(m[1], "%Y%m%dT%H%M%S") if m else None


def pair_seasons(s1: list[str], s2: list[str]) -> list[tuple[str | None, str | None]]:
    """One-to-one pairs (s1, s2) of a location's acquisitions by closest date; leftovers unpaired.

    Returned in order of the S2 date (unpaired S1 last, by date); an acquisition whose name holds no
    date pairs with nothing.
    """
    d1 = {a: _date(a) for a in s1}
    d2 = {a: _date(a) for a in s2}
    pairs = sorted(
        (abs((d1[a] - d2[b]).total_seconds()), a, b)
        for a in s1
        for b in s2
        if d1[a] is not None and d2[b] is not None
    )
    used1, used2, out = set(), set(), []
    for _, a, b in pairs:
        if a not in used1 and b not in used2:
            used1.add(a)
            used2.add(b)
            out.append((a, b))
    out += [(None, b) for b in s2 if b not in used2]
    out.sort(key=lambda p: (d2[p[1]] or datetime.min, p[1]))
    out += [(a, None) for a in sorted(s1, key=lambda a: (d1[a] or datetime.min, a)) if a not in used1]
    return out


@dataclass(frozen=True)
class _Ssl4eo(BandFileSource):
    s2_dir: str = "s2c"  # the S2 product folder read: s2c (L1C) or s2a (L2A)
    samples_noun: ClassVar[str] = "SSL4EO-S12 samples"
    # S1 and S2 are paired by season: a sample lacks one when its location has no acquisition of it.
    missing_why: ClassVar[str] = "no acquisition of the same season; "
    missing_names_folder: ClassVar[bool] = True

    def scan(self, url: str, storage_options: dict | None = None) -> SourceListing:
        # location -> product dir -> acquisition -> band -> [paths]
        found: dict[str, dict[str, dict[str, dict[str, list[str]]]]] = {}
        ignored: list[str] = []
        for full in list_source_files(url, storage_options):
            m = _FILE.search(full)
            if m is None or m["product"] not in ("s1", self.s2_dir):
                ignored.append(full)
                continue
            by_acq = found.setdefault(m["loc"], {}).setdefault(m["product"], {})
            by_acq.setdefault(m["acq"], {}).setdefault(m["band"], []).append(full)
        groups: list[PatchGroup] = []
        for loc in sorted(found):
            s1 = found[loc].get("s1", {})
            s2 = found[loc].get(self.s2_dir, {})
            for k, (a1, a2) in enumerate(pair_seasons(sorted(s1), sorted(s2))):
                files: dict[str, list[str]] = {}
                for mod, acq, bands in (("s1", a1, s1), ("s2", a2, s2)):
                    if acq is not None:
                        files.update({f"{mod}:{b}": p for b, p in bands[acq].items()})
                fields = (("location", loc), ("season_rank", k), ("s1_acquisition", a1 or ""))
                fields += (("s2_acquisition", a2 or ""),)
                groups.append(PatchGroup(SampleId(scene_id=loc, key=f"{loc}_{k}", fields=fields), files))
        return SourceListing(source=url, groups=groups, ignored=ignored)

    def recognises(self, paths: list[str]) -> bool:
        return any((m := _FILE.search(p)) and m["product"] in ("s1", self.s2_dir) for p in paths)


SSL4EO_SOURCE = _Ssl4eo(
    name="ssl4eo-s12",
    title="SSL4EO-S12",
    expected=(
        "s1/<7-digit location>/<acquisition>/{VV,VH}.tif and s2c/<location>/<acquisition>/B1.tif ... B12.tif"
    ),
    modalities={"s1": SSL4EO_S1, "s2": SSL4EO_S2},
    id_fields={"location": "str", "s1_acquisition": "str", "s2_acquisition": "str", "season_rank": "int"},
    pretraining_only=True,
    # S1 and S2 were exported separately per location and are known to be offset by a few pixels:
    # a sample pairs them by location and season, and records each one's grid (``grids``).
    grid_tolerance_m=None,
)

SSL4EO_L2A_SOURCE = replace(
    SSL4EO_SOURCE,
    name="ssl4eo-s12-l2a",
    title="SSL4EO-S12 (L2A)",
    expected=SSL4EO_SOURCE.expected.replace("s2c/", "s2a/"),
    modalities={"s1": SSL4EO_S1, "s2": SSL4EO_S2_L2A},
    s2_dir="s2a",
)
