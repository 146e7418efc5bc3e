"""Per-band statistics computed during ingest, mergeable across workers, parts and machines.

Normalisation statistics must come from the data (never hard-coded) and must not need a second pass
over 180k patches. Each worker keeps exact sums in float64 and a fixed-bin histogram per band; merging
is addition, so ``--workers`` and ``--part i/N`` give the same numbers as one sequential run.

Percentiles come from the histograms: exact for uint16 S2 (one bin per digital number) and to within
the bin width (0.01 dB) for S1 in [-80, 40] dB; values outside fall into the edge bins (their exact
min/max are kept separately).

Robustness comes from what enters, not from trimming what is left: the writer passes each patch's
valid-pixel mask (bands.py ranges, validity.py), so a fill value such as 1e30 never reaches the sums,
and every value that does is physically bounded. A patch within the invalid-pixel limits can then move
a band's mean and std only as much as real values can. The summary adds a robust spread
(``robust_std`` = IQR / 1.349, the normal-consistent interquartile estimate) beside the exact ``std``,
and :func:`implausible_spread` names every band whose std no real scene can produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bands import MODALITIES, Modality

__all__ = ["PERCENTILES", "BandStats", "S1_HIST_RANGE", "S1_HIST_STEP", "implausible_spread"]

PERCENTILES = (0.1, 1.0, 2.0, 5.0, 25.0, 50.0, 75.0, 95.0, 98.0, 99.0, 99.9)
S1_HIST_RANGE = (-80.0, 40.0)
S1_HIST_STEP = 0.01
_IQR_PER_STD = 1.349  # interquartile range of a normal distribution, in standard deviations


def _bins_for(modality: str, table: Modality | None = None) -> int:
    if modality == "s1":
        lo, hi = S1_HIST_RANGE
        return int(round((hi - lo) / S1_HIST_STEP))
    return int(np.iinfo((table or MODALITIES[modality]).dtype).max) + 1


@dataclass
class BandStats:
    """Running statistics of one modality's bands over valid pixels (finite and, when the writer passes
    a mask, within the modality's physical range)."""

    modality: str
    count: np.ndarray  # (C,) int64
    total: np.ndarray  # (C,) float64
    total_sq: np.ndarray  # (C,) float64
    minimum: np.ndarray  # (C,) float64
    maximum: np.ndarray  # (C,) float64
    hist: np.ndarray  # (C, bins) int64
    table: Modality | None = None  # the source's band table (None: SEN12MS's)

    @property
    def bands(self) -> tuple[str, ...]:
        return (self.table or MODALITIES[self.modality]).bands

    @classmethod
    def empty(cls, modality: str, table: Modality | None = None) -> BandStats:
        c = (table or MODALITIES[modality]).channels
        return cls(
            modality=modality,
            count=np.zeros(c, np.int64),
            total=np.zeros(c, np.float64),
            total_sq=np.zeros(c, np.float64),
            minimum=np.full(c, np.inf),
            maximum=np.full(c, -np.inf),
            hist=np.zeros((c, _bins_for(modality, table)), np.int64),
            table=table,
        )

    def update(self, chw: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one patch (C, H, W) in the stored dtype.

        Args:
            chw: the patch.
            valid: (C, H, W) bool, True for pixels that may enter the statistics; ``None``: every
                finite pixel.
        """
        for c, band in enumerate(chw):
            keep = np.isfinite(band) if valid is None else valid[c] & np.isfinite(band)
            if self.modality == "s1":
                values = band[keep].astype(np.float64)
                lo, _ = S1_HIST_RANGE
                idx = np.clip(((values - lo) / S1_HIST_STEP).astype(np.int64), 0, self.hist.shape[1] - 1)
            else:
                values = band.ravel() if valid is None else band[keep]
                idx = values.astype(np.int64)
            if values.size == 0:
                continue
            self.hist[c] += np.bincount(idx, minlength=self.hist.shape[1])
            v = values.astype(np.float64, copy=False)
            self.count[c] += v.size
            self.total[c] += v.sum()
            self.total_sq[c] += np.square(v).sum()  # not np.dot: BLAS threads oversubscribe the workers
            self.minimum[c] = min(self.minimum[c], v.min())
            self.maximum[c] = max(self.maximum[c], v.max())

    def merge(self, other: BandStats) -> BandStats:
        if other.modality != self.modality:
            raise ValueError(f"cannot merge {other.modality} statistics into {self.modality}")
        return BandStats(
            modality=self.modality,
            count=self.count + other.count,
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
            hist=self.hist + other.hist,
            table=self.table,
        )

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat arrays for ``np.savez`` (unit records of the writer)."""
        return {
            f"{prefix}count": self.count,
            f"{prefix}total": self.total,
            f"{prefix}total_sq": self.total_sq,
            f"{prefix}min": self.minimum,
            f"{prefix}max": self.maximum,
            f"{prefix}hist": self.hist,
        }

    @classmethod
    def from_arrays(cls, modality: str, data, prefix: str, table: Modality | None = None) -> BandStats:
        return cls(
            modality=modality,
            count=np.asarray(data[f"{prefix}count"]),
            total=np.asarray(data[f"{prefix}total"]),
            total_sq=np.asarray(data[f"{prefix}total_sq"]),
            minimum=np.asarray(data[f"{prefix}min"]),
            maximum=np.asarray(data[f"{prefix}max"]),
            hist=np.asarray(data[f"{prefix}hist"]),
            table=table,
        )

    def _percentile(self, c: int, q: float) -> float:
        cum = np.cumsum(self.hist[c])
        if cum[-1] == 0:
            return float("nan")
        b = int(np.searchsorted(cum, q / 100.0 * cum[-1], side="left"))
        if self.modality == "s1":
            lo, _ = S1_HIST_RANGE
            value = lo + (b + 0.5) * S1_HIST_STEP  # bin centre
            return float(np.clip(value, self.minimum[c], self.maximum[c]))
        return float(b)

    def summary(self) -> dict:
        """JSON-ready per-band summary for the manifest (NaN where a band saw no valid pixel)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / self.count
            var = np.maximum(self.total_sq / self.count - mean**2, 0.0)
        std = np.sqrt(var)

        def clean(values) -> list[float | None]:
            return [None if not np.isfinite(v) else round(float(v), 6) for v in values]

        channels = range(len(self.count))
        quartiles = np.array([[self._percentile(c, q) for c in channels] for q in (25.0, 75.0)])
        return {
            "bands": list(self.bands),
            "count": [int(v) for v in self.count],
            "mean": clean(mean),
            "std": clean(std),
            "robust_std": clean((quartiles[1] - quartiles[0]) / _IQR_PER_STD),
            "min": clean(self.minimum),
            "max": clean(self.maximum),
            "percentiles": {
                f"p{q:g}": clean([self._percentile(c, q) for c in channels]) for q in PERCENTILES
            },
        }


def implausible_spread(modality: str, summary: dict, table: Modality | None = None) -> list[str]:
    """One message per band of ``summary`` (from :meth:`BandStats.summary`) whose std exceeds the
    modality's ``max_plausible_std``: such a spread means values that are not measurements entered the
    statistics, and every view normalised with them would be noise."""
    bound = (table or MODALITIES[modality]).max_plausible_std
    if bound is None:
        return []
    return [
        f"stats.{modality} band {band}: std {std:.6g} above the plausible {bound:g} "
        f"(robust std {robust}); normalising with it would flatten every {modality} view"
        for band, std, robust in zip(summary["bands"], summary["std"], summary["robust_std"], strict=True)
        if std is not None and std > bound
    ]
