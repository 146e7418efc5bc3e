"""Map-style random access over a dataset's Zarr store: evaluation, linear probes, label-budget subsets.

Training streams the WebDataset shards; evaluation needs the opposite: any row, in any order, a fixed
subset (``test``, ``budget_1024_seed0``) and all labels at once for stratification and metrics. The
Zarr store serves that with one-sample chunks, so ``arr[row]`` reads one chunk (7.5 ms; orthogonal
indexing over random rows is 20-40x slower, ENVIRONMENT.md).

What holds for every item: ``x`` is float32 (C, 256, 256) in ``InputSpec`` channel order (S1 then S2),
S1 clipped to ``inputs.s1_clip`` with non-finite pixels (kept as stored by ingest, docs/FORMAT.md)
replaced by the band mean, every channel standardised with the mean/std of *this* dataset's manifest.
Samples that cannot give such an item (a required sensor missing, no label) are left out at
construction and counted in ``excluded``, so a ``DataLoader`` never meets a hole.

The Zarr group is opened lazily, once per process, and dropped when pickled: a handle (and for S3 its
async HTTP session) must not cross a fork or be pickled to a spawned worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
import zarr

from eossl.ingest.bands import IGBP_CLASSES, IGBP_SIMPLE_CLASSES
from eossl.ingest.bigearthnet import BEN19_CLASSES
from eossl.ingest.format import SUBSETS, ZARR_DIR, check_format
from eossl.ingest.integrity import read_manifest
from eossl.ingest.storage import DatasetRoot

from .inputs import InputSpec, stored_s2_bands

__all__ = ["LABEL_SCHEMES", "ZarrPatchDataset", "resolve_rows"]

# Label scheme -> number of classes; arrays ``label_<scheme>`` / ``multilabel_<scheme>`` in the store.
LABEL_SCHEMES: dict[str, int] = {
    "igbp_simple": len(IGBP_SIMPLE_CLASSES),
    "igbp": len(IGBP_CLASSES),
    "bigearthnet19": len(BEN19_CLASSES),  # multi-label only: label_bigearthnet19 is the lowest class
}
_FIXED_SUBSETS = ("train", "validation", "test", "non_overlapping")  # validation: sources with one (reBEN)


def _read_json(out: DatasetRoot, rel: str, what: str) -> dict:
    if not out.exists(rel):
        raise ValueError(f"{out.path(rel)} not found: {what}")
    return json.loads(out.read_bytes(rel))


def _open_group(out: DatasetRoot) -> zarr.Group:
    return zarr.open_group(out.zarr_store(ZARR_DIR, read_only=True), mode="r")


def resolve_rows(out: DatasetRoot, rows: Sequence[int] | np.ndarray | str | None, n: int) -> np.ndarray:
    """Row indices (int64, in the given order) from explicit indices, a subset name or None (all rows).

    Raises:
        ValueError: an unknown subset name (the message lists the available ones) or a row out of range.
    """
    if rows is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(rows, str):
        subsets = _read_json(out, SUBSETS, "the dataset has no subsets.json")
        named = {name: subsets[name] for name in _FIXED_SUBSETS if name in subsets}
        named.update(subsets.get("budgets", {}))
        if rows not in named:
            raise ValueError(f"unknown subset {rows!r} in {out.path(SUBSETS)}; available: {', '.join(named)}")
        rows = named[rows]
    arr = np.asarray(rows)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"rows must be a 1-D sequence of integers, got {arr.dtype} with shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"rows {bad[:5].tolist()} out of range for {out.url} with {n} samples")
    return arr.astype(np.int64)


class ZarrPatchDataset(torch.utils.data.Dataset):
    """Random access to standardised patches and their scene labels.

    Args:
        dataset: local folder or URL (``s3://...``) holding ``manifest.json`` and ``data.zarr``;
            credentials and endpoint come from the standard ``AWS_*`` environment.
        inputs: sensors, S2 bands and S1 clipping of ``x``; statistics come from the manifest.
        rows: explicit row indices, a subset name from ``subsets.json`` (``train``, ``test``,
            ``validation`` where the source has an official one, ``non_overlapping``,
            ``budget_<B>_seed<S>``) or None for all rows.
        label: ``igbp_simple`` (10 classes), ``igbp`` (17), ``bigearthnet19`` (19, BigEarthNet datasets,
            with ``multilabel``) or None (no ``y``; unlabelled samples kept).
        multilabel: ``y`` as a float32 multi-hot vector instead of a 0-based int64 class index.
        with_lc: also return the land-cover map ``lc`` (4, 256, 256) uint8; samples without one are excluded.

    Attributes:
        rows: the selected Zarr rows after exclusions, in item order.
        excluded: reason -> number of requested rows left out (each row counted once, first reason).
        mean, std: per-channel float32 statistics used for ``x``.
    """

    def __init__(
        self,
        dataset: str,
        inputs: InputSpec,
        rows: Sequence[int] | str | None = None,
        label: str | None = "igbp_simple",
        multilabel: bool = False,
        with_lc: bool = False,
    ):
        if label is not None and label not in LABEL_SCHEMES:
            raise ValueError(f"label must be one of {list(LABEL_SCHEMES)} or None, got {label!r}")
        if multilabel and label is None:
            raise ValueError("multilabel=True needs a label scheme")
        self.dataset = dataset
        self.inputs = inputs
        self.label = label
        self.multilabel = multilabel
        self.with_lc = with_lc
        out = DatasetRoot(dataset)
        manifest = read_manifest(out)  # digest and format version checked; says why when it is missing
        if not out.exists(f"{ZARR_DIR}/zarr.json"):
            raise ValueError(f"{out.path(ZARR_DIR)} not found: dataset ingested without --formats zarr")
        self.mean, self.std = inputs.normalisation(manifest)
        # Non-finite S1 pixels become the band mean (clipped into range): standardised, that is ~0,
        # the "no information" value, and never NaN in a batch.
        slices = inputs.sensor_slices()
        s1_mean = self.mean[slices["s1"]] if "s1" in slices else np.zeros(0, np.float32)
        self._s1_fill = (np.clip(s1_mean, *inputs.s1_clip) if inputs.s1_clip else s1_mean).astype(np.float32)
        self._s2_index = inputs.stored_index(stored_s2_bands(manifest))

        group = _open_group(out)
        check_format(out.path(ZARR_DIR), group.attrs.get("format_version"), group.attrs.get("format"))
        # Metadata read once, whole: a few bytes per sample, and each read on S3 is a request.
        requested = resolve_rows(out, rows, group["key"].shape[0])
        keep = np.ones(len(requested), dtype=bool)
        self.excluded: dict[str, int] = {}

        def exclude(mask: np.ndarray, reason: str) -> None:
            new = mask & keep
            if new.any():
                self.excluded[reason] = int(new.sum())
                keep[new] = False

        for sensor in inputs.sensors:
            exclude(~group[f"has_{sensor}"][:][requested], f"missing {sensor}")
        if with_lc:
            exclude(~group["has_lc"][:][requested], "missing lc")
        self._classes: list[str] = []
        if label is not None:
            codes = group[f"label_{label}"][:][requested].astype(np.int64)
            exclude(codes == 0, "no label")
            self._classes = list(group[f"label_{label}"].attrs["classes"])
            if multilabel:
                self._y = group[f"multilabel_{label}"][:][requested][keep].astype(np.float32)
            else:
                self._y = codes[keep] - 1
        self.rows = requested[keep]
        self.keys = np.array(group["key"][:][self.rows].tolist(), dtype=str)  # plain '<U' (pickles anywhere)
        # After this point: every row has the required sensors (and lc, and a label when asked for).
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (
            f"ZarrPatchDataset({self.dataset!r}, sensors={self.inputs.sensors}, "
            f"channels={self.inputs.channels}, samples={len(self)}, label={self.label!r}, "
            f"excluded={self.excluded})"
        )

    @property
    def classes(self) -> list[str]:
        """Class names of the label scheme, index i = class index i of ``y`` (from the Zarr attrs)."""
        if self.label is None:
            raise ValueError("dataset built with label=None has no classes")
        return list(self._classes)

    def labels(self) -> np.ndarray:
        """All labels of the selected rows at once: int64 (N,) class indices or float32 (N, K) multi-hot."""
        if self.label is None:
            raise ValueError("dataset built with label=None has no labels")
        return self._y.copy()

    def __getstate__(self) -> dict:
        # Handles do not cross processes: a worker opens its own on first access.
        state = self.__dict__.copy()
        state.update(_group=None, _arrays={}, _pid=None)
        return state

    def _array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # first access in this process, or a forked child of one that had it
            self._group = _open_group(DatasetRoot(self.dataset))
            self._arrays = {}
            self._pid = os.getpid()
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def _read_x(self, row: int) -> np.ndarray:
        parts = []
        for sensor in self.inputs.sensors:
            if sensor == "s1":
                s1 = np.asarray(self._array("s1")[row], dtype=np.float32)  # (2, H, W) dB, may hold NaN/Inf
                bad = ~np.isfinite(s1)
                if self.inputs.s1_clip is not None:
                    np.clip(s1, *self.inputs.s1_clip, out=s1)
                if bad.any():
                    s1 = np.where(bad, self._s1_fill[:, None, None], s1)
                parts.append(s1)
            else:
                s2 = self._array("s2")[row]  # (13, H, W) uint16: the whole chunk, bands selected after
                parts.append(s2[self._s2_index].astype(np.float32))
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        # x: (C, H, W) float32 in InputSpec channel order, finite
        x -= self.mean[:, None, None]
        x /= self.std[:, None, None]
        return x

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = int(self.rows[index])
        item = {"x": torch.from_numpy(self._read_x(row)), "key": str(self.keys[index]), "row": row}
        if self.label is not None:
            y = self._y[index]
            # y: () int64 class index, or (K,) float32 multi-hot
            item["y"] = torch.from_numpy(y.copy()) if self.multilabel else torch.tensor(int(y))
        if self.with_lc:
            item["lc"] = torch.from_numpy(np.ascontiguousarray(self._array("lc")[row], dtype=np.uint8))
        return item
