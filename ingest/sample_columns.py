"""The per-sample facts of the unit records as flat columns, read one unit record at a time.

Finalisation needs every sample's key, scene, georeference, availability, labels, split and member
offsets at once (subsets, catalog, split lists, Zarr metadata), but as Python dicts these cost ~6 KB a
sample (1.1 GB for SEN12MS's 180,662 samples). Here each fact is a row of a preallocated numpy array
(the plan's patch count bounds the rows), text as UTF-8 bytes: a few hundred bytes a sample, and a unit
record is dropped once its rows are copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .catalog import CATALOG_MEMBERS, Catalog
from .source import Source

__all__ = ["SampleColumns", "stratum_label"]

# (single-label scheme, its fractions field, classes) of SEN12MS's IGBP labels.
_IGBP = (("igbp", "igbp_fractions", 17), ("igbp_simple", "simple_fractions", 10))


def stratum_label(labels: dict | None, source: Source) -> int:
    """The class a label budget stratifies a sample by (0: unlabelled, never drawn).

    SEN12MS: the simplified IGBP majority class. Multi-label sources have no majority class: the lowest
    class code among the sample's labels stands for it, so that every class still reaches the budget.
    """
    if not labels:
        return 0
    if source.name == "sen12ms":
        return labels["igbp_simple"]
    codes = [c for scheme in source.label_schemes for c in labels.get(f"{scheme}_multi", [])]
    return min(codes) if codes else 0


@dataclass
class _Text:
    """A growing column of text as UTF-8 bytes (``S`` dtype), widened when a longer value comes."""

    values: np.ndarray

    def set(self, row: int, text: str) -> None:
        data = text.encode()
        if len(data) > self.values.dtype.itemsize:
            self.values = self.values.astype(f"S{len(data)}")  # a copy, a few times a dataset
        self.values[row] = data

    def text(self, n: int) -> np.ndarray:
        """The first ``n`` values as ``str`` (``<U`` as wide as the longest, as ``np.array(list, str)``)."""
        return np.strings.decode(self.values[:n], "utf-8") if n else np.zeros(0, str)


@dataclass
class SampleColumns:
    """Every written sample's facts in dataset order (unit order, then order within the unit).

    Attributes:
        n: samples read.
        text: field -> text column (key, scene_id, crs, split and the source's text identity fields).
        ints: the source's integer identity fields (int32, as the Zarr store holds them).
        transform: (rows, 6) float64 affine of each sample.
        has: modality -> bool, the sample's JSON ``modalities`` (the source's modalities).
        invalid: modality -> int32 invalid pixel count.
        labelled: bool, the sample has labels.
        stratum: int32 class a label budget stratifies by (``stratum_label``).
        single: IGBP scheme -> int16 single-label code (SEN12MS; other sources: 0).
        fractions: IGBP scheme -> (rows, classes) float32 (SEN12MS only).
        multi: scheme -> (rows, classes) bool multi-labels (the source's schemes and ``igbp_simple``); the
            writer records each class code once per sample, so counts per class are column sums.
        offset, size, crc32c: catalog member -> int64 data offset, size, CRC-32C in the shard (-1 absent).
        shard: int32 index of the sample's shard in ``shards``.
        shards: the unit records' shard entries, in unit order (units without samples have none).
    """

    n: int
    text: dict[str, _Text]
    ints: dict[str, np.ndarray]
    transform: np.ndarray
    has: dict[str, np.ndarray]
    invalid: dict[str, np.ndarray]
    labelled: np.ndarray
    stratum: np.ndarray
    single: dict[str, np.ndarray]
    fractions: dict[str, np.ndarray]
    multi: dict[str, np.ndarray]
    offset: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    crc32c: dict[str, np.ndarray]
    shard: np.ndarray
    shards: list[dict] = field(default_factory=list)

    @classmethod
    def empty(cls, rows: int, source: Source, zarr: bool = True) -> SampleColumns:
        """Room for ``rows`` samples (the plan's patch count: no more samples than patches).

        Without ``zarr`` the columns only the Zarr store holds (identity fields, label fractions) are left
        out: a dataset of shards alone does not pay for them.
        """
        ids = source.id_fields if zarr else {}
        text_fields = ("key", "scene_id", "crs", "split", *(f for f, k in ids.items() if k == "str"))
        schemes = {**{s: len(c) for s, c in source.label_schemes.items()}, "igbp_simple": 10}
        sen12ms = zarr and source.name == "sen12ms"
        return cls(
            n=0,
            text={f: _Text(np.zeros(rows, "S1")) for f in text_fields},
            ints={f: np.zeros(rows, np.int32) for f, k in ids.items() if k == "int"},
            transform=np.zeros((rows, 6), np.float64),
            has={m: np.zeros(rows, bool) for m in source.modalities},
            invalid={m: np.zeros(rows, np.int32) for m in source.modalities},
            labelled=np.zeros(rows, bool),
            stratum=np.zeros(rows, np.int32),
            single={s: np.zeros(rows, np.int16) for s, _f, _c in _IGBP},
            fractions={s: np.zeros((rows, c), np.float32) for s, _f, c in _IGBP} if sen12ms else {},
            multi={s: np.zeros((rows, c), bool) for s, c in schemes.items()},
            offset={m: np.full(rows, -1, np.int64) for m in CATALOG_MEMBERS},
            size={m: np.full(rows, -1, np.int64) for m in CATALOG_MEMBERS},
            crc32c={m: np.full(rows, -1, np.int64) for m in CATALOG_MEMBERS},
            shard=np.zeros(rows, np.int32),
        )

    def add_record(self, record: dict, source: Source, where: str) -> None:
        """Copy one unit record's samples into the next rows (``where`` names the record in errors)."""
        if record["shard"] is not None:
            self.shards.append(record["shard"])
        for meta, members in zip(record["samples"], record["members"], strict=True):
            row = self.n
            if row == len(self.shard):
                raise ValueError(f"{where}: more samples than the plan has patches ({row})")
            self._add_sample(row, meta, source)
            for member, loc in members.items():
                if member not in self.offset:
                    raise ValueError(
                        f"{where}: sample {meta['key']} has a member {member!r} no catalog holds"
                    )
                self.offset[member][row], self.size[member][row] = loc[0], loc[1]
                if len(loc) > 2:  # records of an ingest resumed from an older version have no CRC
                    self.crc32c[member][row] = loc[2]
            self.shard[row] = len(self.shards) - 1
            self.n += 1

    def _add_sample(self, row: int, meta: dict, source: Source) -> None:
        for name, col in self.text.items():
            col.set(row, meta[name])
        for name, col in self.ints.items():
            col[row] = meta[name]
        self.transform[row] = meta["transform"]
        for mod in self.has:
            self.has[mod][row] = meta["modalities"][mod]
            self.invalid[mod][row] = meta.get(f"{mod}_invalid_pixels", 0)
        labels = meta["labels"]
        self.stratum[row] = stratum_label(labels, source)
        if not labels:
            return
        self.labelled[row] = True
        for scheme, fractions, _ in _IGBP:
            self.single[scheme][row] = labels.get(scheme, 0)
            if scheme in self.fractions:
                self.fractions[scheme][row] = labels[fractions]
        for scheme, multi in self.multi.items():
            multi[row, [c - 1 for c in labels.get(f"{scheme}_multi", [])]] = True

    def trimmed(self) -> SampleColumns:
        """The same columns cut to the rows read (views: no copy)."""
        n = self.n

        def cut(d: dict) -> dict:
            return {k: v[:n] for k, v in d.items()}

        return SampleColumns(
            n=n,
            text={k: _Text(v.values[:n]) for k, v in self.text.items()},
            ints=cut(self.ints),
            transform=self.transform[:n],
            has=cut(self.has),
            invalid=cut(self.invalid),
            labelled=self.labelled[:n],
            stratum=self.stratum[:n],
            single=cut(self.single),
            fractions=cut(self.fractions),
            multi=cut(self.multi),
            offset=cut(self.offset),
            size=cut(self.size),
            crc32c=cut(self.crc32c),
            shard=self.shard[:n],
            shards=self.shards,
        )

    def strings(self, name: str) -> np.ndarray:
        """A text column as ``str`` (built on demand: 4 bytes a character)."""
        return self.text[name].text(self.n)

    def in_split(self, name: str) -> np.ndarray:
        """(rows,) bool: the samples of split ``name`` (train, test, or a source's own, e.g. validation)."""
        return self.text["split"].values[: self.n] == name.encode()

    @property
    def train(self) -> np.ndarray:
        return self.in_split("train")

    def catalog(self) -> Catalog:
        """The sample catalog (``catalog.npz``) of these samples, shards numbered in ``shards`` order."""
        n = self.n
        return Catalog(
            key=self.strings("key") if n else np.zeros(0, dtype="<U1"),
            scene_id=self.strings("scene_id") if n else np.zeros(0, dtype="<U1"),
            shard=self.shard[:n].copy(),
            offset=self.offset,
            size=self.size,
            has={m: self.offset[m] >= 0 for m in CATALOG_MEMBERS if m != "json"},
            train=self.train,
            label_igbp=self.single["igbp"],
            label_igbp_simple=self.single["igbp_simple"],
            multilabel_igbp_simple=self.multi["igbp_simple"],
            crc32c=self.crc32c,
        )

    def shard_rows(self) -> Iterator[tuple[dict, slice]]:
        """(shard entry, its rows) in shard order: a shard's samples are consecutive rows."""
        starts = np.searchsorted(self.shard[: self.n], np.arange(len(self.shards) + 1))
        for i, entry in enumerate(self.shards):
            yield entry, slice(int(starts[i]), int(starts[i + 1]))
