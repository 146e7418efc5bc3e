"""What a source collection is to the ingest: how to find its samples and read one of them.

A ``Source`` answers four questions and nothing else: which band tables its modalities have (names,
dtypes, nodata, physical ranges, patch size), how to list the samples of a tree (``scan``), how to read
one sample's modalities into validated arrays with their georeference and labels (``read``), and which
label schemes its labels use. Everything after reading (shards, statistics, Zarr, catalog, splits,
manifest) is the same for every source, so the dataset format stays one format: the manifest records
the source, its band tables and its label set, and a modality a source lacks is simply absent.

SEN12MS is one source among others (``layout.py`` lists it, ``read.py`` reads it, unchanged); the
registry of all of them is ``sources.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES, MODALITIES, PATCH_SIZE, Modality
from .layout import PatchGroup, SourceListing, parse_patch_file, require_patches, scan_source
from .read import ReadOptions, Reject, Sample, read_patch

__all__ = ["SEN12MS_SOURCE", "Source", "refused"]


@dataclass(frozen=True)
class Source:
    """One source collection (subclasses override ``scan``, ``read`` and ``recognises``).

    Attributes:
        name: the ``--source-format`` value (``sen12ms``, ``bigearthnet-mm``, ``bigearthnet-v2``, ...).
        title: the collection's name in messages.
        expected: how its tree looks, for the error when a tree holds none of its samples.
        modalities: band tables of the modalities it can have, in the order a sample stores them.
        label_schemes: label scheme -> class names (class code i+1 is ``names[i]``); empty: no labels.
        id_fields: the identity fields of a sample (name -> 'str' or 'int'), stored per sample.
        pretraining_only: the source has no labels; evaluation needs a labelled dataset.
        grid_tolerance_m: how far the corners of one sample's modalities may lie apart (CRS units) for
            them to be one grid; None: the source pairs modalities by its own rule (location and
            season) and their grids are recorded per sample, not required to agree.
    """

    name: str
    title: str
    expected: str
    modalities: dict[str, Modality]
    label_schemes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    id_fields: dict[str, str] = field(default_factory=dict)
    pretraining_only: bool = False
    grid_tolerance_m: float | None = 1e-3

    @property
    def patch_size(self) -> int:
        """Height and width of every stored array (all modalities share the finest grid)."""
        sizes = {m.size for m in self.modalities.values()}
        if len(sizes) != 1:
            raise ValueError(f"source {self.name}: modalities of different sizes {sorted(sizes)}")
        return sizes.pop()

    def scan(self, url: str, storage_options: dict | None = None) -> SourceListing:
        raise NotImplementedError

    def require(self, listing: SourceListing) -> None:
        """Refuse a listing with no sample before anything is written (names what was expected)."""
        raise NotImplementedError

    def read(self, group: PatchGroup, options: ReadOptions) -> Sample | Reject:
        raise NotImplementedError

    def recognises(self, paths: list[str]) -> bool:
        """Whether relative paths from the top of a tree (a few levels deep) look like this source."""
        raise NotImplementedError

    def manifest_fields(self) -> dict:
        """What the manifest records about the source (docs/FORMAT.md, "Source")."""
        return {
            "format": self.name,
            "title": self.title,
            "patch_size": self.patch_size,
            "modalities": {name: m.to_json() for name, m in self.modalities.items()},
            "label_schemes": {k: list(v) for k, v in self.label_schemes.items()},
            "pretraining_only": self.pretraining_only,
            "grid_tolerance_m": self.grid_tolerance_m,
        }


def refused(group: PatchGroup) -> Reject | None:
    """The reject of a group refused before reading (``PatchGroup.reject_reason``), else None."""
    if group.reject_reason is None:
        return None
    return Reject(
        key=group.key,
        reason=group.reject_reason,
        files=group.files,
        errors=[{"file": next(iter(group.files.values()))[0], "reason": group.reject_reason}],
    )


@dataclass(frozen=True)
class _Sen12ms(Source):
    def scan(self, url: str, storage_options: dict | None = None) -> SourceListing:
        return scan_source(url, storage_options)

    def require(self, listing: SourceListing) -> None:
        require_patches(listing)

    def read(self, group: PatchGroup, options: ReadOptions) -> Sample | Reject:
        return refused(group) or read_patch(group, options)

    def recognises(self, paths: list[str]) -> bool:
        return any(parse_patch_file(p.rsplit("/", 1)[-1]) is not None for p in paths)


SEN12MS_SOURCE = _Sen12ms(
    name="sen12ms",
    title="SEN12MS",
    expected="ROIs<N>_<season>/{s1,s2,lc}_<scene>/ROIs<N>_<season>_<mod>_<scene>_p<patch>.tif",
    modalities=dict(MODALITIES),
    label_schemes={"igbp": IGBP_CLASSES, "igbp_simple": IGBP_SIMPLE_CLASSES},
    id_fields={"roi": "str", "season": "str", "scene": "int", "patch": "int"},
)
assert SEN12MS_SOURCE.patch_size == PATCH_SIZE
