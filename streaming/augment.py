"""Augmentation parameters for multi-channel SAR and multispectral views, drawn per sample in Python.

The DALI graph (``dali_pipeline.py``) does the pixel work; *what* it does to a sample is decided here,
from ``rng(seed, epoch, position, view)``. That makes every view a pure function of where the sample sits
in the epoch's global order: independent of ranks, reader workers, prefetching, CPU or GPU mode, and
exactly reproducible after a resume.

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

__all__ = ["PRESETS", "AugmentConfig", "ViewParams", "crop_box", "draw_view", "geometry_matrix", "preset"]


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
    """What DALI does to one view of one sample (all float32 arrays, ready for external_source)."""

    matrix: np.ndarray  # (2, 3): output pixel coords -> input pixel coords (continuous, x then y)
    gain: np.ndarray  # (C,)
    offset: np.ndarray  # (C,)
    sigma: np.ndarray  # () blur sigma


def crop_box(rng: np.random.Generator, size: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """Random resized crop box (x0, y0, w, h) in input pixels, torchvision's sampling rule."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= size and 0 < h <= size:
            x0 = rng.uniform(0, size - w)
            y0 = rng.uniform(0, size - h)
            return x0, y0, w, h
    s = size * math.sqrt(min(scale[1], 1.0))  # fallback: centred square crop
    return (size - s) / 2, (size - s) / 2, s, s


def geometry_matrix(box, out_size: int, linear) -> np.ndarray:
    """Affine from output to input coordinates: output square -> (centred transform) -> crop box.

    With ``u = p_out / out_size - 0.5`` (the output square centred at 0), ``p_in = c + diag(w, h) L u``,
    where ``c`` is the box centre and ``L`` the 2x2 flip/rotation/shear part. Plain float arithmetic: it
    runs for every view of every sample in the reader, where NumPy's per-call overhead on 2 x 2 matrices
    cost more than the rest of the draw.
    """
    x0, y0, w, h = box
    (a, b), (c, d) = ((float(v) for v in row) for row in linear)
    s00, s01, s10, s11 = w * a / out_size, w * b / out_size, h * c / out_size, h * d / out_size
    half = out_size / 2
    shift_x = (x0 + w / 2) - (s00 * half + s01 * half)
    shift_y = (y0 + h / 2) - (s10 * half + s11 * half)
    return np.array([[s00, s01, shift_x], [s10, s11, shift_y]], dtype=np.float32)


def _linear_part(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The 2 x 2 flip/rotation/shear part of a view's geometry (a NumPy array only for the random affine:
    rotations by 90 degrees and flips are exact in plain floats)."""
    linear = ((1.0, 0.0), (0.0, 1.0))
    if cfg.rot90:
        for _ in range(int(rng.integers(0, 4))):  # rotate by 90 degrees: [[0, -1], [1, 0]] @ linear
            (a, b), (c, d) = linear
            linear = ((-c, -d), (a, b))
    if rng.random() < cfg.hflip:
        (a, b), row = linear
        linear = ((-a, -b), row)
    if rng.random() < cfg.vflip:
        row, (c, d) = linear
        linear = (row, (-c, -d))
    if cfg.affine_prob > 0 and rng.random() < cfg.affine_prob:
        a = math.radians(rng.uniform(-cfg.affine_rotate_deg, cfg.affine_rotate_deg))
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        shear = np.array(
            [
                [1.0, rng.uniform(-cfg.affine_shear, cfg.affine_shear)],
                [rng.uniform(-cfg.affine_shear, cfg.affine_shear), 1.0],
            ]
        )
        scale = np.diag(rng.uniform(*cfg.affine_scale, size=2))
        return rot @ shear @ scale @ np.array(linear)
    return np.array(linear)


def draw_geometry(rng: np.random.Generator, cfg: AugmentConfig, in_size: int, out_size: int) -> np.ndarray:
    box = crop_box(rng, in_size, cfg.crop_scale, cfg.crop_ratio)
    return geometry_matrix(box, out_size, _linear_part(rng, cfg))


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
    """Draw one view's parameters.

    Args:
        rng: the view's generator (seeded by seed, epoch, position, view).
        channels: channels of the view's stacked input.
        sensor_slices: channel range of each sensor in it (for sensor dropout).
        matrix: reuse this geometry (sensor pairs that must cover the same ground).
        keep: (C,) 0/1 channel mask imposed by the view mode (fusion modes); combined with dropout.
    """
    if matrix is None:
        matrix = draw_geometry(rng, cfg, in_size, out_size)
    gain = np.ones(channels, dtype=np.float32)
    offset = np.zeros(channels, dtype=np.float32)
    if cfg.jitter_prob > 0 and rng.random() < cfg.jitter_prob:
        if cfg.jitter_per_band:
            gain = rng.uniform(*cfg.gain, size=channels).astype(np.float32)
            offset = rng.uniform(*cfg.offset, size=channels).astype(np.float32)
        else:
            gain = np.full(channels, rng.uniform(*cfg.gain, size=1)[0], dtype=np.float32)
            offset = np.full(channels, rng.uniform(*cfg.offset, size=1)[0], dtype=np.float32)
    mask = np.ones(channels, dtype=np.float32) if keep is None else keep.astype(np.float32).copy()
    if cfg.channel_dropout > 0:
        mask *= (rng.random(channels) >= cfg.channel_dropout).astype(np.float32)
    if cfg.sensor_dropout > 0 and len(sensor_slices) > 1 and rng.random() < cfg.sensor_dropout:
        victim = list(sensor_slices)[int(rng.integers(0, len(sensor_slices)))]
        mask[sensor_slices[victim]] = 0.0
    if not mask.any():  # never drop everything: keep the channels the mode asked for
        mask = np.ones(channels, dtype=np.float32) if keep is None else keep.astype(np.float32).copy()
    sigma = NO_BLUR_SIGMA
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        sigma = rng.uniform(*cfg.blur_sigma)
    return ViewParams(
        matrix=matrix.astype(np.float32),
        gain=gain * mask,
        offset=offset * mask,
        sigma=np.array(sigma, dtype=np.float32),
    )
