"""What every source that stores one GeoTIFF per band does with a sample's files (BigEarthNet-MM, SSL4EO-S12).

Such a source differs from the others in how it lists its tree and names its files, not in what makes
a sample's files usable: one file per band key (a second is a duplicate, refused naming it), the
required modalities present, every band of a present modality there, each modality readable onto its
grid (``bandfiles.read_modality``); and a tree without samples is refused the same way.
``BandFileSource`` does that once, in that order, and asks the subclass only for what is its own: how a
band is spelt in its file names, how a missing modality is worded, and the sample's labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .bandfiles import assemble, read_modality
from .layout import NoPatchesError, PatchGroup, SourceListing
from .read import ReadOptions, Reject, Sample, _BadFile
from .source import Source, refused

__all__ = ["BandFileSource"]


@dataclass(frozen=True)
class BandFileSource(Source):
    """A ``Source`` whose groups map ``<modality>:<file band>`` to the band's file (subclasses: ``scan``).

    Class attributes (the same for every instance of a subclass, so not dataclass fields):
        samples_noun: what the error of an empty tree says was not found (``BigEarthNet-MM patches``).
        missing_why: why a required modality can be missing, said in its reject (ends with ``; ``).
        missing_names_folder: a missing modality's reject names the folder of the group's first file
            (where its partner should be), not the file.
    """

    samples_noun: ClassVar[str] = "samples"
    missing_why: ClassVar[str] = ""
    missing_names_folder: ClassVar[bool] = False

    def require(self, listing: SourceListing) -> None:
        if listing.groups:
            return
        found = f"{len(listing.ignored)} other files" if listing.ignored else "nothing"
        raise NoPatchesError(
            f"no {self.samples_noun} found in ingest source {listing.source!r}: expected {self.expected}; "
            f"it holds {found}"
        )

    def read(self, group: PatchGroup, options: ReadOptions) -> Sample | Reject:
        if (early := refused(group)) is not None:
            return early
        errors = [
            {"file": paths[1], "reason": f"duplicate {k} for {group.key}"}
            for k, paths in group.files.items()
            if len(paths) > 1
        ]
        present = [m for m in self.modalities if any(k.startswith(f"{m}:") for k in group.files)]
        missing = [m for m in options.required if m not in present]
        if missing and not errors:
            errors.append(self.missing_modality(group, missing, present))
        reads = {}
        for mod in present if not errors else ():
            try:
                reads[mod] = self._read_modality(group, mod)
            except _BadFile as bad:
                errors.append({"file": bad.path, "reason": bad.reason})
        labels = self.labels(group, errors) if not errors else None
        return assemble(group, reads, errors, options, labels, self.grid_tolerance_m)

    def _read_modality(
        self, group: PatchGroup, mod: str
    ) -> tuple[np.ndarray, str, tuple[float, ...], np.ndarray]:
        """One modality's band files read onto its grid; a band without a file names the folder."""
        table = self.modalities[mod]
        file_bands = {b: self.file_band(mod, b) for b in table.bands}
        files = {b: group.files.get(f"{mod}:{fb}", [None])[0] for b, fb in file_bands.items()}
        absent = [file_bands[b] for b, p in files.items() if p is None]
        if absent:
            where = next(p[0] for k, p in group.files.items() if k.startswith(f"{mod}:"))
            raise _BadFile(where.rsplit("/", 1)[0], f"{mod} band files missing: {absent}")
        return read_modality(files, table)

    def file_band(self, mod: str, band: str) -> str:
        """How the source's file names spell ``band`` of ``mod`` (the band table's name by default)."""
        return band

    def missing_modality(self, group: PatchGroup, missing: list[str], present: list[str]) -> dict[str, str]:
        """The (file, reason) of a group that lacks a required modality."""
        first = next(iter(group.files.values()))[0]
        found = f"found: {', '.join(present) or 'none'}"
        return {
            "file": first.rsplit("/", 1)[0] if self.missing_names_folder else first,
            "reason": f"missing required modality {', '.join(missing)} ({self.missing_why}{found})",
        }

    def labels(self, group: PatchGroup, errors: list[dict[str, str]]) -> object | None:
        """The labels of a group whose files all read (None: no labels); a problem goes to ``errors``."""
        return None
