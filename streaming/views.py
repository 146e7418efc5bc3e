"""The studies' view modes: which input each view of a sample is made of, and how it is augmented.

Exact definitions (also in docs/METHODS.md); S1 is always stacked before S2, absent channels are zero
*after* standardisation (i.e. the band mean):

- ``single``: two augmented views of the same input (``inputs.sensors``: s1, s2 or s1s2).
- ``pair``: view 0 is S1, view 1 is S2 of the same patch (sensor-based positive pairs). With
  ``pair_geometry="shared"`` both views get the same crop/flip/rotation, so they cover the same ground
  area; radiometric jitter and blur are drawn per view. ``pair_augment=False`` gives both full patches.
- ``fusion_all``: both views are S1+S2 stacked.
- ``fusion_partial``: each *sample* is S1 only, S2 only or S1+S2 (``partial_probs``), the same for both of
  its views; the absent sensor's channels are zero.
- ``fusion_optional``: each *view* independently drops one sensor with probability ``optional_drop``
  (which one uniformly), so a pair can be S1+S2 vs S2, S1 vs S1+S2, S1 vs S2, ...
- ``temporal``: two augmented views of ``inputs.sensors``, view 0 from the sample and view 1 from another
  acquisition (season) of the same location, drawn from (seed, epoch, position) (``streaming/temporal.py``
  gives the rule); for datasets whose scene is a location with several seasons (SSL4EO-S12).
- ``multicrop`` (DINO): ``n_global`` crops at ``global_size`` (scale ``global_scale``) then ``n_local`` at
  ``local_size`` (scale ``local_scale``), all of ``inputs.sensors``. As in DINO the crops are augmented
  asymmetrically: global crop ``i`` is blurred with probability ``global_blur[i]`` (1.0 then 0.1: one
  crop always blurred, the other rarely), local crops with ``local_blur`` (0.5). DINO's solarisation of
  the second global crop has no counterpart (docs/METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from eossl.ingest.bands import PATCH_SIZE

from .augment import GEOMETRY_UNIFORMS, AugmentConfig, ViewParams, draw_geometries, draw_views, uniform_count
from .counter_rng import uniforms
from .inputs import InputSpec

__all__ = ["DRAW_RULE", "MODES", "ViewConfig", "ViewSet"]

SAMPLE_STREAM, VIEW_STREAM, MODE_STREAM = 0x5A, 0x100, 0x200  # counter_rng streams of a sample's draws
# How view parameters are drawn, recorded in checkpoints: a run resumed under another rule would get other
# views from the resume on, so the loader refuses it. Change it with any change to what a draw returns.
DRAW_RULE = "philox4x32-10/1"

MODES = ("single", "pair", "fusion_all", "fusion_partial", "fusion_optional", "multicrop", "temporal")


@dataclass(frozen=True)
class ViewConfig:
    """How views are built from a sample.

    Attributes:
        mode: one of MODES (see module docstring).
        inputs: sensors, S2 bands and S1 clipping. For ``pair`` and fusion modes both sensors are used.
        size: output size of each view in ``single``/``pair``/fusion modes (224 for ImageNet-style
            backbones; 256 keeps the full patch resolution).
        augment: per-view augmentation.
        pair_augment: augment sensor pairs (False: both views are the full, unaugmented patch).
        pair_geometry: 'shared' (same ground area in both views) or 'independent'.
        partial_probs: probabilities of S1-only, S2-only, S1+S2 samples in ``fusion_partial``.
        optional_drop: probability that a view drops one sensor in ``fusion_optional``.
        n_global, global_size, global_scale, n_local, local_size, local_scale: DINO multi-crop (DINO's
            code default: 2 global crops of 224 px at scale 0.4-1, 8 local crops of 96 px at 0.05-0.4).
        global_blur: blur probability of each global crop, cycled if there are more crops (DINO: 1.0 for
            the first, 0.1 for the second); local_blur: blur probability of local crops (DINO: 0.5).
            Both apply only when ``augment`` blurs at all (``blur_prob > 0``), so unaugmented views
            stay unblurred.
    """

    mode: str = "single"
    inputs: InputSpec = field(default_factory=InputSpec)
    size: int = 224
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pair_augment: bool = True
    pair_geometry: str = "shared"
    partial_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    optional_drop: float = 0.5
    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    global_blur: tuple[float, ...] = (1.0, 0.1)
    local_blur: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"view mode must be one of {MODES}, got {self.mode!r}")
        if self.pair_geometry not in ("shared", "independent"):
            raise ValueError("pair_geometry must be 'shared' or 'independent'")
        if abs(sum(self.partial_probs) - 1.0) > 1e-6 or min(self.partial_probs) < 0:
            raise ValueError(f"partial_probs must be 3 probabilities summing to 1, got {self.partial_probs}")
        if self.mode == "multicrop" and self.n_global < 1:
            raise ValueError("multicrop needs at least one global crop")
        blur = (*self.global_blur, self.local_blur)
        if not self.global_blur or min(blur) < 0 or max(blur) > 1:
            raise ValueError(f"global_blur and local_blur must be probabilities, got {blur}")


@dataclass(frozen=True)
class _View:
    sensors: tuple[str, ...]
    size: int
    augment: AugmentConfig
    source: int = 0  # which sample of the position the view is made of: 0 itself, 1 its partner (temporal)


def _multicrop_views(cfg: ViewConfig) -> list[_View]:
    """DINO's crops: global crops with their own blur probabilities, then the local crops."""
    blurs = cfg.augment.blur_prob > 0
    sensors = cfg.inputs.sensors
    views = []
    for i in range(cfg.n_global):
        aug = replace(cfg.augment, crop_scale=cfg.global_scale)
        if blurs:
            aug = replace(aug, blur_prob=cfg.global_blur[i % len(cfg.global_blur)])
        views.append(_View(sensors, cfg.global_size, aug))
    loc = replace(cfg.augment, crop_scale=cfg.local_scale)
    if blurs:
        loc = replace(loc, blur_prob=cfg.local_blur)
    return views + [_View(sensors, cfg.local_size, loc)] * cfg.n_local


class ViewSet:
    """The concrete views of a ViewConfig and the draw of their parameters (a batch at a time)."""

    def __init__(self, cfg: ViewConfig, patch_size: int = PATCH_SIZE):
        """``patch_size``: height and width of the dataset's stored patches (its manifest's source)."""
        self.cfg = cfg
        self.patch_size = patch_size
        both = replace(cfg.inputs, sensors=("s1", "s2"))
        self.input_spec = (
            both if cfg.mode in ("pair", "fusion_all", "fusion_partial", "fusion_optional") else cfg.inputs
        )
        if cfg.mode == "pair":
            aug = cfg.augment if cfg.pair_augment else AugmentConfig.none()
            self.views = [_View(("s1",), cfg.size, aug), _View(("s2",), cfg.size, aug)]
        elif cfg.mode == "multicrop":
            self.views = _multicrop_views(cfg)
        elif cfg.mode == "temporal":
            view = _View(self.input_spec.sensors, cfg.size, cfg.augment)
            self.views = [view, replace(view, source=1)]
        else:
            self.views = [_View(self.input_spec.sensors, cfg.size, cfg.augment)] * 2
        # per view, made once: the draw runs for every batch in the reader
        self._specs = [replace(self.input_spec, sensors=view.sensors) for view in self.views]
        self._slices = [spec.sensor_slices() for spec in self._specs]
        self._channels = [spec.channels for spec in self._specs]

    @property
    def sources(self) -> int:
        """Samples read per position: 2 in ``temporal`` mode (the sample and its partner), else 1."""
        return 1 + max(v.source for v in self.views)

    @property
    def sensors(self) -> tuple[str, ...]:
        """Sensors the loader must read for every sample."""
        return self.input_spec.sensors

    def view_spec(self, v: int) -> InputSpec:
        return self._specs[v]

    def channels(self, v: int) -> int:
        return self.view_spec(v).channels

    def draw(self, seed: int, epoch: int, position: int) -> list[ViewParams]:
        """Parameters of every view of the sample at ``position`` of epoch ``epoch``'s global order."""
        return [view[0] for view in self.draw_batch(seed, epoch, np.array([position]))]

    def draw_batch(self, seed: int, epoch: int, positions: np.ndarray) -> list[ViewParams]:
        """Per view, the parameters of the samples at ``positions`` (ViewParams with a batch axis). Row i
        depends only on (seed, epoch, positions[i]): the same as ``draw`` of that position alone.

        Streams (``counter_rng``): ``SAMPLE_STREAM`` for what the views of a sample share (the pair's
        geometry, the fusion_partial choice), ``VIEW_STREAM + v`` for view v's own draw and
        ``MODE_STREAM + v`` for its mode's choice (fusion_optional's dropped sensor).
        """
        positions = np.asarray(positions, dtype=np.int64)
        shared, keeps = self._mode_draws(seed, epoch, positions)
        counts = [uniform_count(channels, shared is None) for channels in self._channels]
        drawn = uniforms(seed, epoch, positions, VIEW_STREAM + np.arange(len(self.views)), max(counts))
        # Views with the same recipe (DINO's local crops, the two views of ``single``) in one draw: a draw
        # is row by row, so stacking their rows changes no number and saves the per-call overhead.
        groups: dict[_View, list[int]] = {}
        for v, view in enumerate(self.views):
            groups.setdefault(view, []).append(v)
        b = len(positions)
        params: list[ViewParams | None] = [None] * len(self.views)
        for view, members in groups.items():
            first, k = members[0], len(members)
            out = draw_views(
                drawn[:, members, : counts[first]].reshape(b * k, counts[first]),
                view.augment,
                self._channels[first],
                self._slices[first],
                self.patch_size,
                view.size,
                matrix=None if shared is None else np.repeat(shared, k, axis=0),
                keep=None
                if keeps[first] is None
                else np.stack([keeps[v] for v in members], 1).reshape(b * k, -1),
            )
            if k == 1:
                params[first] = out
                continue
            for j, v in enumerate(members):
                params[v] = ViewParams(
                    *(
                        np.ascontiguousarray(a.reshape(b, k, *a.shape[1:])[:, j])
                        for a in (out.matrix, out.gain, out.offset, out.sigma)
                    )
                )
        return params

    def _mode_draws(
        self, seed: int, epoch: int, positions: np.ndarray
    ) -> tuple[np.ndarray | None, list[np.ndarray | None]]:
        """What the view mode decides before the views' own draws: the pair's shared geometry (B, 2, 3)
        and each view's (B, C) channel mask (fusion_partial: per sample; fusion_optional: per view)."""
        cfg, b = self.cfg, len(positions)
        shared = None
        if cfg.mode == "pair" and cfg.pair_geometry == "shared":
            u = uniforms(seed, epoch, positions, SAMPLE_STREAM, GEOMETRY_UNIFORMS)
            shared = draw_geometries(u, self.views[0].augment, self.patch_size, cfg.size)
        keeps: list[np.ndarray | None] = [None] * len(self.views)
        if cfg.mode == "fusion_partial":  # each sample: S1 only, S2 only or both
            u = uniforms(seed, epoch, positions, SAMPLE_STREAM, 1)[:, 0]
            choice = np.searchsorted(np.cumsum(cfg.partial_probs)[:-1], u, side="right")
            slices = self.input_spec.sensor_slices()
            keep = np.ones((b, self.input_spec.channels))
            keep[choice == 0, slices["s2"]] = 0.0
            keep[choice == 1, slices["s1"]] = 0.0
            keeps = [keep] * len(self.views)
        if cfg.mode == "fusion_optional":  # each view: drops one sensor (which: uniformly) or none
            for v, slices in enumerate(self._slices):
                u = uniforms(seed, epoch, positions, MODE_STREAM + v, 2)
                keeps[v] = np.ones((b, self._channels[v]))
                dropped = u[:, 0] < cfg.optional_drop
                for k, sensor in enumerate(("s1", "s2")):
                    keeps[v][dropped & ((u[:, 1] * 2).astype(int) == k), slices[sensor]] = 0.0
        return shared, keeps
