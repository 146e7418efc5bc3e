"""Find SEN12MS patches in a source tree and group their files by (ROI, season, scene, patch).

The source is a local folder or any fsspec URL (``s3://bucket/sen12ms/``). Grouping is by file name
alone, so a tree with missing modalities, extra folders (SEN12MS-CR's ``s2_cloudy_*``) or stray files
still yields every patch that is there; what does not parse is reported as ignored, never fatal.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import fsspec

from .bands import MODALITY_NAMES

__all__ = [
    "ARCHIVE_SUFFIXES",
    "NoPatchesError",
    "PatchGroup",
    "PatchId",
    "SampleId",
    "SourceListing",
    "find_source_files",
    "list_source_files",
    "parse_patch_file",
    "require_patches",
    "scan_source",
]

# What the SEN12MS download holds before extraction (ROIs1158_spring_s1.tar.gz, ...).
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_EXPECTED = (
    "SEN12MS GeoTIFFs named like ROIs1158_spring_s1_1_p30.tif, in ROIs<N>_<season>/{s1,s2,lc}_<scene>/ "
    "folders"
)


class NoPatchesError(ValueError):
    """A source holds no SEN12MS patch: an ingest of it would write an empty dataset."""


# ROIs1158_spring_s1_1_p30.tif -> ROIs1158, spring, s1, 1, 30
_PATCH_FILE = re.compile(
    r"^(?P<roi>ROIs\d+)_(?P<season>spring|summer|fall|winter)_(?P<mod>s1|s2|lc)_(?P<scene>\d+)_p(?P<patch>\d+)\.tiff?$",
    re.IGNORECASE,
)


@dataclass(frozen=True, order=True)
class PatchId:
    """Identity of one SEN12MS location; orders ROI, season, scene, patch numerically."""

    roi: str
    season: str
    scene: int
    patch: int

    @property
    def roi_season(self) -> str:
        return f"{self.roi}_{self.season}"

    @property
    def scene_id(self) -> str:
        """Scene identity across the dataset; scene numbers repeat between ROI/season folders."""
        return f"{self.roi}_{self.season}_{self.scene}"

    @property
    def key(self) -> str:
        """WebDataset / Zarr sample key, e.g. ``ROIs1158_spring_1_p30`` (no dots: WebDataset splits there)."""
        return f"{self.roi}_{self.season}_{self.scene}_p{self.patch}"

    def metadata(self) -> dict[str, str | int]:
        """The identity fields a sample's JSON member and the Zarr store carry."""
        return {"roi": self.roi, "season": self.season, "scene": self.scene, "patch": self.patch}


@dataclass(frozen=True, order=True)
class SampleId:
    """Identity of one sample of a source other than SEN12MS (see ``source.py``).

    Attributes:
        scene_id: the unit a split keeps on one side (overlapping or co-acquired samples share it:
            a BigEarthNet S2 product, an SSL4EO-S12 location).
        key: WebDataset / Zarr sample key (no dots).
        fields: the source's own identity fields, written into the sample JSON and the Zarr store.
    """

    scene_id: str
    key: str
    fields: tuple[tuple[str, str | int], ...] = ()

    def metadata(self) -> dict[str, str | int]:
        return dict(self.fields)


@dataclass
class PatchGroup:
    """The files found for one patch: modality name -> list of paths/URLs (more than one is a defect)."""

    pid: PatchId | SampleId
    files: dict[str, list[str]] = field(default_factory=dict)
    # Set when the group is refused before reading (a patch the dataset's authors list as unusable).
    reject_reason: str | None = None
    # What the source's listing knows about the sample beyond its files (reBEN's metadata table: its
    # labels and official split), carried with the group to the process that reads it.
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.pid.key


@dataclass
class SourceListing:
    """Everything a scan found, in the deterministic order every ingest part agrees on."""

    source: str
    groups: list[PatchGroup]
    ignored: list[str]
    # What the scan learnt about the tree as a whole that no sample carries (reBEN: the metadata tables
    # read, table rows with no file in the tree); recorded in the manifest's ``source.listing``.
    notes: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 over the sorted file list: parts of one ingest check they saw the same source."""
        h = hashlib.sha256()
        for g in self.groups:
            for mod in sorted(g.files):
                for path in g.files[mod]:
                    h.update(path.encode() + b"\n")
        return h.hexdigest()


def parse_patch_file(name: str) -> tuple[PatchId, str] | None:
    """Parse a SEN12MS file name into its patch identity and modality, or None if it is not one."""
    m = _PATCH_FILE.match(name)
    if m is None:
        return None
    pid = PatchId(
        roi=m["roi"],
        season=m["season"].lower(),
        scene=int(m["scene"]),
        patch=int(m["patch"]),
    )
    return pid, m["mod"].lower()


def list_source_files(source: str, storage_options: dict | None = None) -> list[str]:
    """Every file under the folder ``source``, sorted, as a local path or a URL of ``source``'s scheme.

    Sorted so that every process or machine that scans the same tree sees the same order; URLs keep
    their scheme (``s3://bucket/...``) so that a reader opens them through the same filesystem.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        NotADirectoryError: ``source`` is a file.
    """
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {source!r} does not exist")
    if not fs.isdir(root):
        raise NotADirectoryError(f"ingest source {source!r} is not a folder")
    local = protocol in ("file", "local")
    return [path if local else f"{protocol}://{path}" for path in sorted(fs.find(root))]


def scan_source(source: str, storage_options: dict | None = None) -> SourceListing:
    """List ``source`` recursively and group SEN12MS GeoTIFFs by patch.

    Returns groups sorted by (ROI, season, scene, patch) so that every process or machine that scans
    the same tree derives the same sample order, shard plan and split.
    """
    groups: dict[PatchId, PatchGroup] = {}
    ignored: list[str] = []
    for full in list_source_files(source, storage_options):
        name = full.rsplit("/", 1)[-1]
        parsed = parse_patch_file(name)
        if parsed is None:
            ignored.append(full)
            continue
        pid, mod = parsed
        assert mod in MODALITY_NAMES
        groups.setdefault(pid, PatchGroup(pid)).files.setdefault(mod, []).append(full)
    ordered = [groups[pid] for pid in sorted(groups)]
    return SourceListing(source=source, groups=ordered, ignored=ignored)


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def require_patches(listing: SourceListing) -> None:
    """Refuse a source with no patch before anything is written: says what was expected and what is there.

    Raises:
        NoPatchesError: no file name parses as a SEN12MS patch; archives found are named with how to
            extract them.
    """
    if listing.groups:
        return
    archives = [p.rsplit("/", 1)[-1] for p in listing.ignored if _is_archive(p.rsplit("/", 1)[-1])]
    found = (
        f"it holds {len(listing.ignored)} other files (e.g. "
        f"{', '.join(p.rsplit('/', 1)[-1] for p in listing.ignored[:3])})"
        if listing.ignored
        else "it is empty"
    )
    if archives:
        found = (
            f"it holds {len(archives)} archives ({', '.join(archives[:3])}): extract them first (e.g. "
            f"`tar xzf {archives[0]}` in that folder) and ingest the extracted folder"
        )
    raise NoPatchesError(
        f"no SEN12MS patches found in ingest source {listing.source!r}: expected {_EXPECTED}; {found}"
    )


def find_source_files(fs, root: str, limit: int = 5) -> tuple[list[str], list[str]]:
    """Up to ``limit`` SEN12MS GeoTIFF names and archive names under ``root`` (three folder levels deep):
    enough to tell a source tree from a dataset without listing 540k files."""
    patches: list[str] = []
    archives: list[str] = []
    for _, _, files in fs.walk(root, maxdepth=3):
        for name in sorted(files):
            if parse_patch_file(name) is not None:
                patches.append(name)
            elif _is_archive(name) and name.startswith("ROIs"):
                archives.append(name)
        if len(patches) >= limit:
            break
    return patches[:limit], archives[:limit]
