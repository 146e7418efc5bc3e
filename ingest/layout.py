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

__all__ = ["PatchGroup", "PatchId", "SourceListing", "parse_patch_file", "scan_source"]

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


@dataclass
class PatchGroup:
    """The files found for one patch: modality name -> list of paths/URLs (more than one is a defect)."""

    pid: PatchId
    files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.pid.key


@dataclass
class SourceListing:
    """Everything a scan found, in the deterministic order every ingest part agrees on."""

    source: str
    groups: list[PatchGroup]
    ignored: list[str]

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


def _join(root: str, rel: str, protocol: str) -> str:
    return rel if protocol == "local" else f"{protocol}://{rel}"


def scan_source(source: str, storage_options: dict | None = None) -> SourceListing:
    """List ``source`` recursively and group SEN12MS GeoTIFFs by patch.

    Returns groups sorted by (ROI, season, scene, patch) so that every process or machine that scans
    the same tree derives the same sample order, shard plan and split.
    """
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    protocol = "local" if protocol in ("file", "local") else protocol
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {source!r} does not exist")
    if not fs.isdir(root):
        raise NotADirectoryError(f"ingest source {source!r} is not a folder")
    groups: dict[PatchId, PatchGroup] = {}
    ignored: list[str] = []
    for path in sorted(fs.find(root)):
        name = path.rsplit("/", 1)[-1]
        parsed = parse_patch_file(name)
        full = _join(root, path, protocol)
        if parsed is None:
            ignored.append(full)
            continue
        pid, mod = parsed
        assert mod in MODALITY_NAMES
        groups.setdefault(pid, PatchGroup(pid)).files.setdefault(mod, []).append(full)
    ordered = [groups[pid] for pid in sorted(groups)]
    return SourceListing(source=source, groups=ordered, ignored=ignored)
