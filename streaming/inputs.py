"""Which channels a model sees, and how they are normalised: one definition for training and evaluation.

An ``InputSpec`` names the sensors (``s1``, ``s2`` or both, always stacked S1 first), the S2 bands and
the S1 dB clipping; with the dataset manifest it yields the per-channel mean and std. The statistics
always come from the dataset that was ingested (``manifest.json``), never from constants in code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eossl.ingest.bands import PATCH_SIZE, S1, S2, S2_LAND_BANDS

__all__ = ["S2_BAND_SETS", "InputSpec", "dataset_patch_size", "parse_sensors", "stored_s2_bands"]


def stored_s2_bands(manifest: dict) -> tuple[str, ...]:
    """The S2 bands a dataset stores, in stored order (its statistics name them; SEN12MS's 13 when the
    dataset has no S2 statistics)."""
    bands = (manifest.get("stats") or {}).get("s2", {}).get("bands")
    return tuple(bands) if bands else S2.bands


def dataset_patch_size(manifest: dict) -> int:
    """Height and width of a dataset's stored patches (datasets without a source record are SEN12MS)."""
    return int((manifest.get("source") or {}).get("patch_size", PATCH_SIZE))


S2_BAND_SETS: dict[str, tuple[str, ...]] = {
    "all": S2.bands,
    "land": S2_LAND_BANDS,  # the 10 bands of the SEN12MS classification benchmark
    "rgb": ("B4", "B3", "B2"),
}

_SENSORS = {"s1": ("s1",), "s2": ("s2",), "s1s2": ("s1", "s2")}


def parse_sensors(text: str) -> tuple[str, ...]:
    """'s1' | 's2' | 's1s2' -> sensor tuple."""
    try:
        return _SENSORS[text]
    except KeyError:
        raise ValueError(f"input must be one of {list(_SENSORS)}, got {text!r}") from None


@dataclass(frozen=True)
class InputSpec:
    """The stacked input of a view.

    Attributes:
        sensors: ('s1',), ('s2',) or ('s1', 's2'); stacked in this order.
        s2_bands: S2 band names in the order they are stacked, or a set name ('land', 'all', 'rgb').
            'land' (B2-B8, B8A, B11, B12) is the SEN12MS benchmark choice; B1/B9/B10 are atmospheric.
        s1_clip: dB range S1 is clipped to before normalisation ([-25, 0] keeps >99 % of land
            backscatter and removes the long tail of speckle and corner reflectors); None keeps all.
    """

    sensors: tuple[str, ...] = ("s1", "s2")
    s2_bands: tuple[str, ...] | str = "land"
    s1_clip: tuple[float, float] | None = (-25.0, 0.0)

    def __post_init__(self) -> None:
        if (
            not self.sensors
            or any(s not in ("s1", "s2") for s in self.sensors)
            or len(set(self.sensors)) != len(self.sensors)
        ):
            raise ValueError(f"sensors must be a subset of ('s1', 's2'), got {self.sensors}")
        bands = self.bands_s2
        unknown = [b for b in bands if b not in S2.bands]
        if unknown or not bands:
            raise ValueError(f"unknown S2 bands {unknown}; valid: {', '.join(S2.bands)}")
        if self.s1_clip is not None and not self.s1_clip[0] < self.s1_clip[1]:
            raise ValueError(f"s1_clip must be (low, high) with low < high, got {self.s1_clip}")

    @classmethod
    def parse(cls, sensors: str, s2_bands: str = "land", s1_clip: tuple[float, float] | None = (-25.0, 0.0)):
        bands: tuple[str, ...] | str = (
            s2_bands
            if s2_bands in S2_BAND_SETS
            else tuple(b.strip() for b in s2_bands.split(",") if b.strip())
        )
        return cls(sensors=parse_sensors(sensors), s2_bands=bands, s1_clip=s1_clip)

    @property
    def bands_s2(self) -> tuple[str, ...]:
        return S2_BAND_SETS[self.s2_bands] if isinstance(self.s2_bands, str) else tuple(self.s2_bands)

    @property
    def s2_index(self) -> np.ndarray:
        """Indices of the selected bands in the stored 13-band S2 array."""
        return np.array([S2.bands.index(b) for b in self.bands_s2], dtype=np.int64)

    def stored_index(self, stored: Sequence[str]) -> np.ndarray:
        """Indices of the selected bands in a dataset's stored S2 array (``stored_s2_bands``).

        Raises:
            ValueError: a selected band the dataset does not store (BigEarthNet L2A has no B10).
        """
        absent = [b for b in self.bands_s2 if b not in stored]
        if absent:
            raise ValueError(
                f"the dataset stores no S2 band {', '.join(absent)} (its bands: {', '.join(stored)}); "
                "choose s2_bands among them"
            )
        return np.array([list(stored).index(b) for b in self.bands_s2], dtype=np.int64)

    @property
    def channel_names(self) -> list[str]:
        names = []
        if "s1" in self.sensors:
            names += [f"s1:{b}" for b in S1.bands]
        if "s2" in self.sensors:
            names += [f"s2:{b}" for b in self.bands_s2]
        return names

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    def sensor_slices(self) -> dict[str, slice]:
        """Channel range of each sensor in the stacked input (for sensor dropout and fusion modes)."""
        out, start = {}, 0
        for s in self.sensors:
            n = S1.channels if s == "s1" else len(self.bands_s2)
            out[s] = slice(start, start + n)
            start += n
        return out

    def normalisation(self, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) float32 from the manifest's band statistics.

        Raises:
            ValueError: the manifest lacks statistics for a selected band (e.g. a dataset without S2).
        """
        stats = manifest.get("stats", {})
        mean, std = [], []
        for sensor in self.sensors:
            bands = S1.bands if sensor == "s1" else self.bands_s2
            st = stats.get(sensor)
            # The statistics name the bands they hold, in stored order (a source may lack some).
            table = tuple(st["bands"]) if st and st.get("bands") else (S1 if sensor == "s1" else S2).bands
            for band in bands:
                if band not in table:
                    raise ValueError(f"dataset manifest has no statistics for {sensor} {band}")
                i = table.index(band)
                m = st["mean"][i] if st else None
                s = st["std"][i] if st else None
                if m is None or s is None:
                    raise ValueError(f"dataset manifest has no statistics for {sensor} {band}")
                mean.append(m)
                std.append(s if s > 0 else 1.0)
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def to_json(self) -> dict:
        return {
            "sensors": list(self.sensors),
            "s2_bands": list(self.bands_s2),
            "s1_clip": list(self.s1_clip) if self.s1_clip else None,
            "channels": self.channel_names,
        }
