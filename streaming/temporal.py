"""Temporal positives: the second view of a sample comes from another season of the same location.

SSL4EO-S12 holds four seasonal acquisitions per location, ingested as one sample per season with the
location as the sample's scene (``ingest/ssl4eo.py``). In the ``temporal`` view mode
(``streaming/views.py``) view 0 is made from the sample at a position of the epoch's order and view 1
from its **partner**, chosen by this rule:

- the candidates are the other samples of the same scene (location) in the epoch's sample set (the
  split and sensor filter the loader applies), i.e. the location's other seasons;
- the partner is drawn uniformly among them by ``numpy.random.default_rng([seed, epoch, position,
  0x7E])``, so it is a pure function of (seed, epoch, position) and of the sample set: every worker
  count and every resume from a ``LoaderPosition`` draws the same partner (the loader's resume already
  checks the sample set's digest and the seed);
- a sample whose location has no other sample in the set is its own partner (both views from one
  acquisition, as in the ``single`` mode); the loader counts such samples and warns.

The partner is read as a second sample (its members are a second byte range, usually in the same shard,
since one location's samples are written one after another).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TEMPORAL_SOURCES", "SeasonPartners"]

# Formats whose scene is a location with several acquisitions (``manifest.source.format``).
TEMPORAL_SOURCES = ("ssl4eo-s12", "ssl4eo-s12-l2a")
_STREAM = 0x7E


@dataclass(frozen=True)
class SeasonPartners:
    """The candidates of every row of an epoch's sample set (rows grouped by scene, in row order).

    Attributes:
        grouped: the sample set's rows sorted by (scene, row).
        start, count: per dataset row, where its scene's group starts in ``grouped`` and its length
            (-1 / 0 for rows outside the sample set).
    """

    grouped: np.ndarray
    start: np.ndarray
    count: np.ndarray

    @classmethod
    def build(cls, rows: np.ndarray, scene_ids: np.ndarray) -> SeasonPartners:
        """From the epoch's ``rows`` (dataset row ids) and the catalog's ``scene_id`` of every row."""
        rows = np.asarray(rows, dtype=np.int64)
        scenes = np.asarray(scene_ids)[rows]
        order = np.lexsort((rows, scenes))
        grouped = rows[order]
        _, first, inverse, counts = np.unique(
            scenes[order], return_index=True, return_inverse=True, return_counts=True
        )
        start = np.full(len(scene_ids), -1, dtype=np.int64)
        count = np.zeros(len(scene_ids), dtype=np.int64)
        start[grouped] = first[inverse]
        count[grouped] = counts[inverse]
        return cls(grouped, start, count)

    @property
    def alone(self) -> int:
        """Samples of the set whose scene has no other sample: they are their own partner."""
        return int((self.count[self.grouped] == 1).sum())

    def partner(self, row: int, seed: int, epoch: int, position: int) -> int:
        """The row view 1 of the sample ``row`` at ``position`` of epoch ``epoch`` is made from."""
        start, n = int(self.start[row]), int(self.count[row])
        if n < 1:
            raise ValueError(f"row {row} is not in the epoch's sample set")
        if n == 1:
            return row
        group = self.grouped[start : start + n]
        own = int(np.searchsorted(group, row))
        k = int(np.random.default_rng([seed, epoch, position, _STREAM]).integers(n - 1))
        return int(group[k if k < own else k + 1])
