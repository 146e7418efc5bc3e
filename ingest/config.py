"""Ingest configuration: one dataclass that flows from the CLI to every stage of the writer."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from .bands import MODALITIES
from .read import ReadOptions

__all__ = ["FORMATS", "IngestConfig", "SplitOptions", "default_workers", "parse_part", "parse_size"]

FORMATS = ("wds", "zarr")


def default_workers() -> int:
    """One reader/writer process per core (GeoTIFF decoding is CPU bound), at most 4."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class SplitOptions:
    """Scene-level hold-out split and label-budget subsets.

    Attributes:
        holdout_fraction: share of scenes held out for testing when no scene list is given.
        seed: seed of the scene split.
        holdout_scenes: explicit test scenes (``ROIs1158_spring_1``, or as the published hold-out list
            spells them, ``ROIs1158_spring/s1_1``); overrides the fraction.
        split_lists: folder or URL holding the published patch-level lists ``train_list`` and
            ``test_list`` (``.txt`` or ``.pkl``); overrides the fraction, excludes ``holdout_scenes``.
        budgets: label budgets to draw from the training split (e.g. 64, 256, 1024).
        budget_seeds: one subset per (budget, seed); report mean and spread over seeds.
    """

    holdout_fraction: float = 0.1
    seed: int = 0
    holdout_scenes: tuple[str, ...] | None = None
    split_lists: str | None = None
    budgets: tuple[int, ...] = (64, 256, 1024)
    budget_seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if self.holdout_scenes is not None and self.split_lists is not None:
            raise ValueError(
                "give either hold-out scenes or split lists, not both: each defines the test set"
            )


@dataclass(frozen=True)
class IngestConfig:
    """Everything an ingest run needs.

    Attributes:
        source: source tree (SEN12MS, BigEarthNet-MM or SSL4EO-S12), local folder or fsspec URL.
        dataset: output folder or URL.
        formats: which outputs to keep: 'wds' (tar shards), 'zarr' (random access store).
        workers: parallel reader/writer processes (GeoTIFF decoding is CPU bound: one per core, see
            :func:`default_workers`).
        part: (i, n): this process handles units i, i+n, i+2n, ... so n machines can ingest in
            parallel; ``eossl ingest merge`` finishes the dataset when all parts are done.
        shard_bytes: target tar shard size (256 MB = 256 x 10^6 bytes, as ``--shard-size 256MB``).
            100-500 MB keeps S3 request rates low while leaving enough shards for ranks x workers to
            share (see docs/FORMAT.md).
        zarr_shard_samples: samples per Zarr shard (one file per shard per array).
        read: acceptance rules for patches.
        split: split and subset options.
        progress: show a progress bar.
        command: the command line, recorded in the manifest.
        source_format: the source collection (``sen12ms``, ``bigearthnet-mm``, ``bigearthnet-v2``,
            ``ssl4eo-s12``); None: detected from the tree (``sources.detect_source``).
        reject_lists: files naming samples the dataset's authors list as unusable (BigEarthNet's
            seasonal snow and cloud/shadow lists); each is rejected with the list's reason.
    """

    source: str
    dataset: str
    formats: tuple[str, ...] = FORMATS
    workers: int = field(default_factory=default_workers)
    part: tuple[int, int] = (0, 1)
    shard_bytes: int = 256 * 10**6
    zarr_shard_samples: int = 64
    read: ReadOptions = field(default_factory=ReadOptions)
    split: SplitOptions = field(default_factory=SplitOptions)
    progress: bool = True
    command: tuple[str, ...] = ()
    source_format: str | None = None
    reject_lists: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        unknown = [m for m in self.read.required if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown required modality {unknown}; choose from {list(MODALITIES)}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.shard_bytes <= 0 or self.zarr_shard_samples <= 0:
            raise ValueError("shard sizes must be positive")

    def plan_options(self) -> dict:
        """The options that decide the dataset's content; a resumed or merged run must match them."""
        return {
            "formats": sorted(self.formats),
            "shard_bytes": self.shard_bytes,
            "zarr_shard_samples": self.zarr_shard_samples,
            "read": asdict(self.read),
            "split": asdict(self.split),
        }


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
}


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '4000000' -> bytes."""
    m = _SIZE.match(str(text))
    unit = (m[2] or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot parse size {text!r} (examples: 256MB, 1GiB, 4000000)")
    return int(float(m[1]) * _UNITS[unit])


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise ValueError(f"part must look like i/N (e.g. 0/4), got {text!r}")
    i, n = int(m[1]), int(m[2])
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"part {text!r}: need 0 <= i < N")
    return i, n
