"""Augmentation parameters for multi-channel SAR and multispectral views, drawn for a batch at once.

The DALI graph (``dali_pipeline.py``) does the pixel work; *what* it does to a sample is decided here,
from a row of uniforms per sample that is a pure function of (seed, epoch, position, view)
(``counter_rng``). That makes every view a pure function of where the sample sits in the epoch's global
order: independent of the batch, ranks, reader workers, prefetching, CPU or GPU mode, and exactly
reproducible after a resume. Each part of a draw reads fixed columns of the row (``uniform_count``), so
what one part draws never shifts another's numbers; and a batch is drawn with a few array operations
per view, not a dozen scalar draws per sample.

All geometry (random resized crop, flips, 90-degree rotations, a small random affine standing in for
elastic deformation) is folded into one 2x3 affine matrix per view, so the image is resampled once.
Radiometry works on standardised values, per band: ``x * gain + offset`` (gain 0 drops a channel or a
whole sensor). No RGB colour operator is used anywhere: they assume 3 correlated channels in [0, 1].

Named presets (``PRESETS``, ``preset``): ``default`` (MoCo-v2's recipe adapted to overhead imagery) and
``moco_study`` (the MoCo SEN12MS study's: no crop, flips, blur, elastic-like distortion, brightness and
contrast shared by all bands of a view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PRESETS",
    "AugmentConfig",
    "GEOMETRY_UNIFORMS",
    "ViewParams",
    "crop_boxes",
    "draw_geometries",
    "draw_view",
    "draw_views",
    "geometry_matrices",
    "geometry_matrix",
    "preset",
    "uniform_count",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Per-view augmentation. Defaults follow MoCo-v2, adapted to overhead multispectral/SAR imagery.

    Attributes:
        crop_scale: area fraction of the random resized crop (MoCo-v2: 0.2-1.0).
        crop_ratio: aspect-ratio range of the crop.
        hflip, vflip: flip probabilities (overhead images have no canonical up: both 0.5).
        rot90: rotate by a random multiple of 90 degrees.
        affine_prob: probability of a small random affine (shear, anisotropic scale, rotation): the
            closest DALI op to elastic deformation that runs in both GPU and CPU mode (docs/METHODS.md).
        affine_shear, affine_scale, affine_rotate_deg: its ranges.
        blur_prob, blur_sigma: Gaussian blur probability and sigma range in output pixels.
        jitter_prob: probability of per-band gain/offset jitter.
        gain, offset: ranges on standardised values (offset in units of the band's std).
        jitter_per_band: True draws gain and offset per band (a spectral jitter); False draws one gain
            (contrast) and one offset (brightness) for every band of the view, which keeps the spectral
            shape of each pixel (the MoCo study's brightness/contrast).
        channel_dropout: probability that each channel is zeroed (its mean after standardisation).
        sensor_dropout: probability that one sensor of a fused view is zeroed (never all sensors).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    affine_prob: float = 0.0
    affine_shear: float = 0.1
    affine_scale: tuple[float, float] = (0.9, 1.1)
    affine_rotate_deg: float = 10.0
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    jitter_prob: float = 0.8
    gain: tuple[float, float] = (0.8, 1.2)
    offset: tuple[float, float] = (-0.2, 0.2)
    jitter_per_band: bool = True
    channel_dropout: float = 0.0
    sensor_dropout: float = 0.0

    @classmethod
    def none(cls) -> AugmentConfig:
        """Identity: full patch, no flips, no blur, no jitter (for 'without augmentation' pairs and tests)."""
        return cls(
            crop_scale=(1.0, 1.0),
            crop_ratio=(1.0, 1.0),
            hflip=0.0,
            vflip=0.0,
            rot90=False,
            blur_prob=0.0,
            jitter_prob=0.0,
        )

    @classmethod
    def moco_study(cls) -> AugmentConfig:
        """The MoCo SEN12MS study's augmentation, applied to each sensor independently.

        The study's code uses Gaussian blur, elastic deformation, horizontal and vertical flips and random
        brightness/contrast, each with probability 0.5, and no random resized crop. Elastic deformation
        needs a per-pixel remap, which DALI only has on the GPU: a random affine (shear, anisotropic scale,
        small rotation) with the same probability replaces it here, so CPU and GPU compute the same views
        (docs/METHODS.md). Brightness/contrast is one offset and one gain for every band, +-0.2 on
        standardised values.
        """
        return cls(
            crop_scale=(1.0, 1.0),
            crop_ratio=(1.0, 1.0),
            hflip=0.5,
            vflip=0.5,
            rot90=False,
            affine_prob=0.5,
            blur_prob=0.5,
            jitter_prob=0.5,
            jitter_per_band=False,
        )


PRESETS = ("default", "moco_study")


def preset(name: str) -> AugmentConfig:
    """The augmentation named ``name`` (one of ``PRESETS``)."""
    if name == "default":
        return AugmentConfig()
    if name == "moco_study":
        return AugmentConfig.moco_study()
    raise ValueError(f"augmentation preset must be one of {', '.join(PRESETS)}, got {name!r}")


# A sigma this small makes DALI's per-sample window 3 taps with edge weights ~e^-5000 == 0: an exact
# identity in float32, so "no blur" needs no branch in the graph.
NO_BLUR_SIGMA = 0.01


@dataclass(frozen=True)
class ViewParams:
    """What DALI does to one view of one sample (float32 arrays, ready for external_source); the same
    fields with a leading batch axis for a batch of samples (``draw_views``)."""

    matrix: np.ndarray  # (2, 3): output pixel coords -> input pixel coords (continuous, x then y)
    gain: np.ndarray  # (C,)
    offset: np.ndarray  # (C,)
    sigma: np.ndarray  # () blur sigma

    def __getitem__(self, i: int) -> ViewParams:
        """Sample ``i`` of a batch of parameters."""
        return ViewParams(self.matrix[i], self.gain[i], self.offset[i], self.sigma[i])


# Uniforms each part of a view's draw consumes, in this order (``uniform_count``). Fixed per config, so
# a view's numbers never shift with what an earlier part happened to draw.
CROP_ATTEMPTS = 10  # torchvision's random resized crop: up to 10 tries, then a centred crop
GEOMETRY_UNIFORMS = 4 * CROP_ATTEMPTS + 3 + 6  # crop tries (area, ratio, x, y), rot90 + flips, random affine
_ROT90 = np.array([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]], float)


def uniform_count(channels: int, geometry: bool = True) -> int:
    """Uniforms one view's draw consumes (``draw_views``): its geometry (unless given), jitter (1 + 2C),
    channel dropout (C), sensor dropout (2) and blur (2)."""
    return (GEOMETRY_UNIFORMS if geometry else 0) + 1 + 3 * channels + 4


def crop_boxes(
    u: np.ndarray, size: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> np.ndarray:
    """Random resized crop boxes (B, 4) = (x0, y0, w, h) in input pixels, torchvision's rule: an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first of up to 10 tries
    that fits, else a centred square. ``u``: (B, 40) uniforms, 4 per try (area, ratio, x, y)."""
    tries = u[:, : 4 * CROP_ATTEMPTS].reshape(len(u), CROP_ATTEMPTS, 4)
    target = size * size * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(low + (high - low) * tries[..., 1])
    w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    w, h = w[rows, first], h[rows, first]
    x0 = tries[rows, first, 2] * (size - w)
    y0 = tries[rows, first, 3] * (size - h)
    centred = size * math.sqrt(min(scale[1], 1.0))
    found = fits.any(axis=1)
    x0 = np.where(found, x0, (size - centred) / 2)
    y0 = np.where(found, y0, (size - centred) / 2)
    return np.stack([x0, y0, np.where(found, w, centred), np.where(found, h, centred)], axis=1)


def geometry_matrices(boxes: np.ndarray, out_size: int, linear: np.ndarray) -> np.ndarray:
    """Affines (B, 2, 3) from output to input coordinates: output square -> (centred transform) -> box.

    With ``u = p_out / out_size - 0.5`` (the output square centred at 0), ``p_in = c + diag(w, h) L u``,
    where ``c`` is the box centre and ``L`` (B, 2, 2) the flip/rotation/shear part.
    """
    x0, y0, w, h = (boxes[:, i] for i in range(4))
    scaled = linear * np.stack([w, h], axis=1)[:, :, None] / out_size  # diag(w, h) L / out_size
    centre = np.stack([x0 + w / 2, y0 + h / 2], axis=1)
    shift = centre - scaled.sum(axis=2) * (out_size / 2)
    return np.concatenate([scaled, shift[:, :, None]], axis=2)


def geometry_matrix(box, out_size: int, linear) -> np.ndarray:
    """``geometry_matrices`` of one box and 2 x 2 linear part, as float32 (2, 3)."""
    boxes = np.asarray(box, dtype=np.float64).reshape(1, 4)
    return geometry_matrices(boxes, out_size, np.asarray(linear, float)[None])[0].astype(np.float32)


def _linear_parts(u: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """(B, 2, 2) flip/rotation/shear parts from (B, 9) uniforms: rot90, hflip, vflip, then the random
    affine's (apply, angle, 2 shears, 2 scales)."""
    linear = _ROT90[(u[:, 0] * 4).astype(int) if cfg.rot90 else np.zeros(len(u), int)].copy()
    linear[:, 0] *= np.where(u[:, 1] < cfg.hflip, -1.0, 1.0)[:, None]
    linear[:, 1] *= np.where(u[:, 2] < cfg.vflip, -1.0, 1.0)[:, None]
    if cfg.affine_prob <= 0:
        return linear
    angle = np.radians(cfg.affine_rotate_deg * (2 * u[:, 4] - 1))
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], axis=1)
    shear = np.ones((len(u), 2, 2))
    shear[:, 0, 1] = cfg.affine_shear * (2 * u[:, 5] - 1)
    shear[:, 1, 0] = cfg.affine_shear * (2 * u[:, 6] - 1)
    low, high = cfg.affine_scale
    scale = np.zeros((len(u), 2, 2))
    scale[:, 0, 0] = low + (high - low) * u[:, 7]
    scale[:, 1, 1] = low + (high - low) * u[:, 8]
    distorted = rot @ shear @ scale @ linear
    return np.where((u[:, 3] < cfg.affine_prob)[:, None, None], distorted, linear)


def draw_geometries(u: np.ndarray, cfg: AugmentConfig, in_size: int, out_size: int) -> np.ndarray:
    """(B, 2, 3) float64 view geometries (crop, rotation, flips, affine) from (B, >= 49) uniforms."""
    boxes = crop_boxes(u, in_size, cfg.crop_scale, cfg.crop_ratio)
    return geometry_matrices(boxes, out_size, _linear_parts(u[:, 4 * CROP_ATTEMPTS : GEOMETRY_UNIFORMS], cfg))


def draw_views(
    u: np.ndarray,
    cfg: AugmentConfig,
    channels: int,
    sensor_slices: dict[str, slice],
    in_size: int,
    out_size: int,
    matrix: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> ViewParams:
    """One view's parameters for a batch of samples, each from its own row of uniforms.

    Args:
        u: (B, ``uniform_count(channels, geometry=matrix is None)``) uniforms in [0, 1), one row per
            sample (``counter_rng.uniforms``: a pure function of seed, epoch, position and view).
        channels: channels of the view's stacked input.
        sensor_slices: channel range of each sensor in it (for sensor dropout).
        matrix: (B, 2, 3) geometry to reuse (sensor pairs that must cover the same ground).
        keep: (B, C) 0/1 channel mask imposed by the view mode (fusion modes); combined with dropout.

    Returns: ViewParams with a batch axis: matrix (B, 2, 3), gain and offset (B, C), sigma (B,).
    """
    b = len(u)
    if u.shape[1] != uniform_count(channels, geometry=matrix is None):
        raise ValueError(
            f"{u.shape[1]} uniforms per sample, the view needs {uniform_count(channels, matrix is None)}"
        )
    if matrix is None:
        matrix, u = draw_geometries(u, cfg, in_size, out_size), u[:, GEOMETRY_UNIFORMS:]
    jitter, u = u[:, : 1 + 2 * channels], u[:, 1 + 2 * channels :]
    gain, offset = np.ones((b, channels)), np.zeros((b, channels))
    if cfg.jitter_prob > 0:
        g, o = jitter[:, 1 : 1 + channels], jitter[:, 1 + channels :]
        if not cfg.jitter_per_band:  # one gain (contrast) and one offset (brightness) for every band
            g, o = np.repeat(g[:, :1], channels, axis=1), np.repeat(o[:, :1], channels, axis=1)
        on = (jitter[:, 0] < cfg.jitter_prob)[:, None]
        gain = np.where(on, cfg.gain[0] + (cfg.gain[1] - cfg.gain[0]) * g, 1.0)
        offset = np.where(on, cfg.offset[0] + (cfg.offset[1] - cfg.offset[0]) * o, 0.0)
    wanted = np.ones((b, channels)) if keep is None else np.asarray(keep, dtype=np.float64)
    mask = wanted.copy()
    if cfg.channel_dropout > 0:
        mask *= u[:, :channels] >= cfg.channel_dropout
    sensors = list(sensor_slices)
    if cfg.sensor_dropout > 0 and len(sensors) > 1:
        victim = np.minimum((u[:, channels + 1] * len(sensors)).astype(int), len(sensors) - 1)
        dropped = u[:, channels] < cfg.sensor_dropout
        for k, sensor in enumerate(sensors):
            mask[dropped & (victim == k), sensor_slices[sensor]] = 0.0
    empty = ~mask.any(axis=1)  # never drop everything: keep the channels the mode asked for
    mask[empty] = wanted[empty]
    blur = u[:, channels + 2 :]
    sigma = np.full(b, NO_BLUR_SIGMA)
    if cfg.blur_prob > 0:
        low, high = cfg.blur_sigma
        sigma = np.where(blur[:, 0] < cfg.blur_prob, low + (high - low) * blur[:, 1], NO_BLUR_SIGMA)
    return ViewParams(
        matrix=matrix.astype(np.float32),
        gain=(gain * mask).astype(np.float32),
        offset=(offset * mask).astype(np.float32),
        sigma=sigma.astype(np.float32),
    )


def draw_view(
    rng: np.random.Generator,
    cfg: AugmentConfig,
    channels: int,
    sensor_slices: dict[str, slice],
    in_size: int,
    out_size: int,
    matrix: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> ViewParams:
    """One sample's ``draw_views``, its uniforms from ``rng`` (tests and one-off views; the loader draws
    whole batches from ``counter_rng``). ``matrix`` (2, 3) and ``keep`` (C,) as there, for this sample."""
    u = rng.random((1, uniform_count(channels, geometry=matrix is None)))
    params = draw_views(
        u,
        cfg,
        channels,
        sensor_slices,
        in_size,
        out_size,
        matrix=None if matrix is None else np.asarray(matrix)[None],
        keep=None if keep is None else np.asarray(keep)[None],
    )
    return params[0]
