"""reBEN (BigEarthNet v2.0) as an ingest source: S1/S2 band folders paired and labelled by its metadata table.

Layout (the archives ``BigEarthNet-S1`` and ``BigEarthNet-S2`` extracted beside the two tables):

- ``BigEarthNet-S2/<tile product>/<patch_id>/<patch_id>_B01.tif ... _B12.tif, _B8A.tif``: one GeoTIFF per
  band at its native resolution (as v1.0: 120 / 60 / 20 px at 10 / 20 / 60 m, L2A x 10000, no B10), and
  no metadata file per folder;
- ``BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_VV.tif, _VH.tif`` (120 x 120 px, backscatter in dB);
- ``metadata.parquet`` at the top of the source tree: one row per patch, which pairs and labels them;
- ``metadata_for_patches_with_snow_cloud_or_shadow.parquet`` beside it: the same columns for the patches
  the dataset's authors took out of ``metadata.parquet`` (seasonal snow, clouds or cloud shadows).

What this module relies on, from the tables as reBEN publishes them (and as the loaders built on them,
e.g. ConfigILM's BENv2 data set, read them): columns ``patch_id`` (the S2 patch name, which is also its
folder's name), ``labels`` (a list of class names, already in the 19-class nomenclature of Sumbul et al.
2021), ``split`` (``train``, ``validation`` or ``test``: the official split), ``country``, ``s1_name``
(the S1 patch paired with it), and in the second table ``contains_seasonal_snow`` and
``contains_cloud_or_shadow`` (booleans). Other columns (``s2v1_name``, ...) are not read. A column
missing, a patch or S1 name that is not a Sentinel patch name, a split value outside the three, or one
patch listed twice is an error naming the table and the row: the table decides the split, and a
misread split would silently train on test patches.

Without pyarrow a parquet table cannot be read (it is not a dependency of its own): the same table as
CSV (``metadata.csv``, labels joined by ``;`` or as a JSON list) is read instead, and the error on a
parquet file says how to convert it.

A sample is a table row: its key is ``patch_id``, its scene (kept on one side of a split when the
dataset's own scene split is used) the S2 tile product, its labels the row's 19-class labels and its
split the row's. Every input is either written or listed as rejected, with why: a snow/cloud patch; an
S2 folder or an S1 folder that no row names; a row whose S1 (or S2) files are not in the tree (a
missing required modality, naming the S1 patch the table expected). Rows with no file at all in the tree
(a partial download) are counted in the manifest's ``source.listing``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import fsspec

from .band_source import BandFileSource
from .bigearthnet import _S1_NAME, _S2_FILE_BAND, _S2_NAME, BEN19_CLASSES, BEN_S1, BEN_S2, _s2_identity
from .layout import PatchGroup, SampleId, SourceListing, list_source_files

__all__ = [
    "FLAG_COLUMNS",
    "OFFICIAL_SPLITS",
    "REBEN_SOURCE",
    "REQUIRED_COLUMNS",
    "SNOW_CLOUD_TABLE",
    "TABLE_FILES",
    "RebenLabels",
    "TableRow",
    "read_table",
]

# The metadata tables, at the top of the source tree; the CSV spellings are read when pyarrow is absent.
TABLE = "metadata.parquet"
SNOW_CLOUD_TABLE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
TABLE_FILES: tuple[str, ...] = (TABLE, "metadata.csv")
SNOW_CLOUD_FILES: tuple[str, ...] = (SNOW_CLOUD_TABLE, SNOW_CLOUD_TABLE.replace(".parquet", ".csv"))

REQUIRED_COLUMNS: tuple[str, ...] = ("patch_id", "labels", "split", "country", "s1_name")
# Flag column -> the reject reason of a patch where it is true.
FLAG_COLUMNS: dict[str, str] = {
    "contains_seasonal_snow": "covered by seasonal snow",
    "contains_cloud_or_shadow": "covered by clouds or cloud shadows",
}
OFFICIAL_SPLITS: tuple[str, ...] = ("train", "validation", "test")

_CONVERT = (
    "python -c \"import pandas as p; t = p.read_parquet('{name}'); t['labels'] = t['labels'].map(';'.join); "
    "t.to_csv('{csv}', index=False)\""
)

BEN2_S2 = replace(
    BEN_S2, unit="Sentinel-2 L2A (Sen2Cor) bottom-of-atmosphere reflectance x 10000, no B10 (reBEN)"
)
BEN2_S1 = replace(BEN_S1, unit="backscatter sigma0 in dB (reBEN: IW GRD, terrain corrected)")

_S2_BAND_FILE = re.compile(rf"^(?P<name>{_S2_NAME})_(?P<band>B0[1-9]|B1[0-2]|B8A)\.tif$")
_S1_BAND_FILE = re.compile(rf"^(?P<name>{_S1_NAME})_(?P<pol>VV|VH)\.tif$")


@dataclass(frozen=True)
class TableRow:
    """One row of a reBEN metadata table (``where``: the table's file name and the row, for messages)."""

    patch_id: str
    labels: tuple[str, ...]
    split: str
    country: str
    s1_name: str
    flags: tuple[str, ...]
    where: str


@dataclass(frozen=True)
class RebenLabels:
    """A patch's 19-class labels: codes (1-based, ``BEN19_CLASSES``) and the table's names."""

    codes: tuple[int, ...]
    names: tuple[str, ...]

    def to_json(self) -> dict:
        return {"bigearthnet19_multi": list(self.codes), "names": list(self.names)}


def _parquet_columns(data: bytes, path: str) -> tuple[list[str], dict[str, list]]:
    """(every column name, the columns read: required and flags) of a parquet table."""
    name = path.rsplit("/", 1)[-1]
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - only a parquet table needs it
    except ImportError:
        csv_name = name.replace(".parquet", ".csv")
        raise ValueError(
            f"{path}: reading a parquet table needs pyarrow, which is not installed; install it, or convert "
            f"the table once to {csv_name} beside it (the ingest reads that instead): "
            + _CONVERT.format(name=name, csv=csv_name)
        ) from None
    try:
        names = list(pq.ParquetFile(io.BytesIO(data)).schema_arrow.names)
        wanted = [n for n in names if n in REQUIRED_COLUMNS or n in FLAG_COLUMNS]
        return names, pq.read_table(io.BytesIO(data), columns=wanted).to_pydict()
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the file's fault
        raise ValueError(f"{path}: not a readable parquet table ({exc})") from exc


def _csv_columns(data: bytes, path: str) -> tuple[list[str], dict[str, list]]:
    """(every column name, every column) of a CSV table."""
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        names = list(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV table ({exc})") from exc
    return names, {n: [r[n] for r in rows] for n in names}


def _csv_labels(cell: str, where: str) -> list[str]:
    """A CSV cell of labels: a JSON list, or names joined by ``;`` (class names hold commas, never ``;``)."""
    cell = (cell or "").strip()
    if cell.startswith("["):
        try:
            value = json.loads(cell)
        except ValueError as exc:
            raise ValueError(f"{where}: labels {cell[:60]!r} is not a JSON list ({exc})") from exc
        return value
    return [n.strip() for n in cell.split(";") if n.strip()]


def _flag(value: object, column: str, where: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise ValueError(f"{where}: {column} is {value!r}, not a boolean")


def read_table(data: bytes, path: str) -> list[TableRow]:
    """The rows of a reBEN metadata table (``path`` ending in ``.parquet`` or ``.csv``), checked.

    Raises:
        ValueError: naming ``path`` (and the row): a column missing, a patch or S1 name that is not a
            Sentinel patch name, a split outside ``OFFICIAL_SPLITS``, labels that are not a list of names,
            a flag that is not a boolean, or pyarrow missing for a parquet table.
    """
    is_csv = path.endswith(".csv")
    found, columns = _csv_columns(data, path) if is_csv else _parquet_columns(data, path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
            f"a reBEN metadata table has {', '.join(REQUIRED_COLUMNS)}"
        )
    name = path.rsplit("/", 1)[-1]
    flags = [c for c in FLAG_COLUMNS if c in columns]
    rows: list[TableRow] = []
    for i in range(len(columns["patch_id"])):
        where = f"{name} row {i + 1}"
        patch_id, s1_name = str(columns["patch_id"][i]).strip(), str(columns["s1_name"][i]).strip()
        if re.fullmatch(_S2_NAME, patch_id) is None:
            raise ValueError(f"{path}: row {i + 1}: patch_id {patch_id!r} is not a Sentinel-2 patch name")
        if re.fullmatch(_S1_NAME, s1_name) is None:
            raise ValueError(f"{path}: row {i + 1}: s1_name {s1_name!r} is not a Sentinel-1 patch name")
        split = str(columns["split"][i]).strip()
        if split not in OFFICIAL_SPLITS:
            raise ValueError(
                f"{path}: row {i + 1}: split {split!r} is not one of {', '.join(OFFICIAL_SPLITS)} (the table "
                "decides the split: a patch of unknown split is refused rather than guessed)"
            )
        labels = columns["labels"][i]
        labels = _csv_labels(labels, f"{path}: row {i + 1}") if is_csv else labels
        if not isinstance(labels, (list, tuple)) or not all(isinstance(n, str) for n in labels):
            raise ValueError(f"{path}: row {i + 1}: labels {labels!r} is not a list of class names")
        on = tuple(c for c in flags if _flag(columns[c][i], c, f"{path}: row {i + 1}"))
        rows.append(TableRow(patch_id, tuple(labels), split, str(columns["country"][i]), s1_name, on, where))
    return rows


def _top_file(paths: set[str], prefix: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` present at the top of the tree: parquet when pyarrow imports, else CSV."""
    present = [f"{prefix}/{n}" for n in names if f"{prefix}/{n}" in paths]
    if len(present) > 1 and present[0].endswith(".parquet"):
        try:
            import pyarrow.parquet  # noqa: F401, PLC0415 - whether the parquet table can be read
        except ImportError:
            return present[1]
    return present[0] if present else None


def _reject_of(row: TableRow, snow_cloud: bool) -> str | None:
    """Why a row's patch is refused before reading (flagged, or labels outside the nomenclature)."""
    if row.flags:
        why = " and ".join(FLAG_COLUMNS[c] for c in row.flags)
        return f"{why} ({row.where}: {', '.join(row.flags)})"
    if snow_cloud:
        return f"covered by seasonal snow, clouds or cloud shadows (listed in {row.where})"
    unknown = [n for n in row.labels if n not in BEN19_CLASSES]
    if unknown:
        return f"{row.where}: label(s) {unknown} are not in the 19-class nomenclature"
    return None


@dataclass(frozen=True)
class _Reben(BandFileSource):
    samples_noun: ClassVar[str] = "reBEN patches"
    missing_names_folder: ClassVar[bool] = True

    def scan(self, url: str, storage_options: dict | None = None) -> SourceListing:
        listed = list_source_files(url, storage_options)
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = root.rstrip("/") if protocol in ("file", "local") else f"{protocol}://{root.rstrip('/')}"
        paths = set(listed)
        table = _top_file(paths, prefix, TABLE_FILES)
        if table is None:
            raise ValueError(
                f"ingest source {url!r} has no {TABLE} (or metadata.csv) at its top: reBEN pairs its S1 and "
                "S2 patches and labels them through that table; put it (or a link to it) there"
            )
        snow_cloud = _top_file(paths, prefix, SNOW_CLOUD_FILES)
        tables = [t for t in (table, snow_cloud) if t is not None]
        notes: dict = {"tables": {}}
        rows: list[tuple[TableRow, bool]] = []
        seen: dict[str, str] = {}
        seen_s1: dict[str, str] = {}
        for path in tables:
            data = fs.cat_file(path)
            table_rows = read_table(data, path)
            name = path.rsplit("/", 1)[-1]
            notes["tables"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "rows": len(table_rows)}
            for row in table_rows:
                for key, index, what in ((row.patch_id, seen, "patch_id"), (row.s1_name, seen_s1, "s1_name")):
                    if key in index:
                        raise ValueError(
                            f"{what} {key} is in {index[key]} and in {row.where}: one patch, two rows"
                        )
                    index[key] = row.where
                rows.append((row, path == snow_cloud))

        s2: dict[str, dict[str, list[str]]] = {}
        s1: dict[str, dict[str, list[str]]] = {}
        ignored: list[str] = []
        for full in listed:
            name = full.rsplit("/", 1)[-1]
            if full in tables:
                continue
            if m := _S2_BAND_FILE.match(name):
                s2.setdefault(m["name"], {}).setdefault(f"s2:{m['band']}", []).append(full)
            elif m := _S1_BAND_FILE.match(name):
                s1.setdefault(m["name"], {}).setdefault(f"s1:{m['pol']}", []).append(full)
            else:
                ignored.append(full)

        groups: list[PatchGroup] = []
        absent: list[str] = []
        for row, flagged in rows:
            files = {**s2.pop(row.patch_id, {}), **s1.pop(row.s1_name, {})}
            if not files:
                absent.append(row.patch_id)
                continue
            base = _s2_identity(row.patch_id)
            pid = SampleId(
                scene_id=base.scene_id,
                key=row.patch_id,
                fields=(*base.fields, ("country", row.country), ("s1_patch", row.s1_name)),
            )
            meta = {"labels": list(row.labels), "split": row.split, "s1_name": row.s1_name, "row": row.where}
            groups.append(PatchGroup(pid, files, reject_reason=_reject_of(row, flagged), meta=meta))
        named = " or ".join(t.rsplit("/", 1)[-1] for t in tables)
        for name, files in s2.items():
            reason = f"S2 patch not in {named}: its labels, split and S1 partner are unknown"
            if snow_cloud is None:
                reason += (
                    f" ({SNOW_CLOUD_TABLE}, which lists the snow and cloud patches, is not in the source)"
                )
            groups.append(PatchGroup(_s2_identity(name), files, reject_reason=reason))
        for name, files in s1.items():
            pid = SampleId(scene_id=name, key=name, fields=(("s1_patch", name),))
            reason = f"S1 patch named by no s1_name of {named}: its S2 partner is unknown"
            groups.append(PatchGroup(pid, files, reject_reason=reason))
        if absent:
            notes["warnings"] = [
                f"{len(absent)} rows of {named} have no S1 or S2 file in the source (e.g. "
                f"{', '.join(absent[:3])}); counted in the manifest (source.listing)"
            ]
        notes["rows_without_files"] = len(absent)
        notes["rows_without_files_examples"] = absent[:20]
        ordered = sorted(groups, key=lambda g: (g.pid.scene_id, g.pid.key))
        return SourceListing(source=url, groups=ordered, ignored=ignored, notes=notes)

    def file_band(self, mod: str, band: str) -> str:
        return _S2_FILE_BAND[band] if mod == "s2" else band

    def missing_modality(self, group: PatchGroup, missing: list[str], present: list[str]) -> dict[str, str]:
        """Names what the table expected and the tree lacks: the row's S1 patch, or its S2 folder."""
        entry = super().missing_modality(group, missing, present)
        row = group.meta.get("row", "the metadata table")
        why = {
            "s1": f"S1 patch {group.meta.get('s1_name')} named by {row} is not in the source",
            "s2": f"S2 patch folder {group.key} named by {row} is not in the source",
        }
        entry["reason"] = (
            f"missing required modality {', '.join(missing)} ({'; '.join(why[m] for m in missing)}; "
            f"found: {', '.join(present) or 'none'})"
        )
        return entry

    def labels(self, group: PatchGroup, errors: list[dict[str, str]]) -> RebenLabels | None:
        """The row's 19-class labels (checked against the nomenclature while scanning)."""
        names = tuple(group.meta.get("labels", ()))
        return RebenLabels(tuple(sorted({BEN19_CLASSES.index(n) + 1 for n in names})), names)

    def recognises(self, paths: list[str]) -> bool:
        if not any(p in TABLE_FILES for p in paths):
            return False
        names = [p.rsplit("/", 1)[-1] for p in paths]
        return any(_S2_BAND_FILE.match(n) or _S1_BAND_FILE.match(n) for n in names)


REBEN_SOURCE = _Reben(
    name="bigearthnet-v2",
    title="reBEN (BigEarthNet v2.0)",
    expected=(
        "metadata.parquet (or metadata.csv) at the top, BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B01.tif "
        "... _B12.tif and BigEarthNet-S1/<product>/<s1_name>/<s1_name>_VV.tif, _VH.tif"
    ),
    modalities={"s1": BEN2_S1, "s2": BEN2_S2},
    label_schemes={"bigearthnet19": BEN19_CLASSES},
    id_fields={
        "product": "str",
        "season": "str",
        "row": "int",
        "col": "int",
        "country": "str",
        "s1_patch": "str",
    },
    # As v1.0: S1 patches were cut to the S2 patches' footprints from separately terrain-corrected
    # scenes; corners within half a 10 m pixel are the same grid cell.
    grid_tolerance_m=5.0,
)
