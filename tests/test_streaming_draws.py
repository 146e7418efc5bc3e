"""View parameters drawn for a batch: Philox against Random123's known answers, every draw against scalar
references written here from the rules' definitions, and a batch equal to its samples drawn alone."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from eossl.streaming.augment import (
    GEOMETRY_UNIFORMS,
    NO_BLUR_SIGMA,
    AugmentConfig,
    crop_boxes,
    draw_views,
    preset,
    uniform_count,
)
from eossl.streaming.counter_rng import philox4x32, uniforms
from eossl.streaming.inputs import InputSpec
from eossl.streaming.views import MODES, ViewConfig, ViewSet

# Random123's tests/kat_vectors for philox4x32 with 10 rounds: (counter, key, output)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_reproduces_random123_known_answers(counter, key, expected):
    assert philox4x32(np.array(counter), key).tolist() == list(expected)
    batch = philox4x32(np.array([counter, counter]), key)  # vectorised: every row the same answer
    assert batch.tolist() == [list(expected)] * 2


def test_uniforms_are_a_pure_function_of_seed_epoch_position_and_stream():
    positions = np.array([0, 5, 2**32 - 1, 17])
    u = uniforms(7, 3, positions, 0x100, 9)
    assert u.shape == (4, 9) and u.dtype == np.float64 and (u >= 0).all() and (u < 1).all()
    for i, p in enumerate(positions):  # a row does not depend on the other positions of the batch
        np.testing.assert_array_equal(uniforms(7, 3, [p], 0x100, 9)[0], u[i])
    np.testing.assert_array_equal(uniforms(7, 3, positions, 0x100, 20)[:, :9], u)  # longer: same start
    several = uniforms(7, 3, positions, np.array([0x101, 0x100]), 9)
    np.testing.assert_array_equal(several[:, 1], u)
    for other in (
        uniforms(8, 3, positions, 0x100, 9),
        uniforms(7, 4, positions, 0x100, 9),
        uniforms(7, 3, positions, 0x101, 9),
        uniforms(7 + 2**32, 3, positions, 0x100, 9),  # the seed's high word is part of the key
    ):
        assert not np.isclose(other, u).any()
    many = uniforms(0, 0, np.arange(20000), 1, 10).ravel()
    assert abs(many.mean() - 0.5) < 0.005 and abs(many.var() - 1 / 12) < 0.002
    assert np.histogram(many, bins=10, range=(0, 1))[0].min() > 0.97 * len(many) / 10
    with pytest.raises(ValueError, match="positions"):
        uniforms(0, 0, [2**32], 1, 2)
    with pytest.raises(ValueError, match="epoch"):
        uniforms(0, -1, [0], 1, 2)


def _crop_reference(u_row, size, scale, ratio):
    """torchvision's RandomResizedCrop rule, one try at a time, with this row's numbers."""
    for t in range(10):
        area_u, ratio_u, x_u, y_u = u_row[4 * t : 4 * t + 4]
        target = size * size * (scale[0] + (scale[1] - scale[0]) * area_u)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * ratio_u)
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= size and 0 < h <= size:
            return x_u * (size - w), y_u * (size - h), w, h
    side = size * math.sqrt(min(scale[1], 1.0))
    return (size - side) / 2, (size - side) / 2, side, side


@pytest.mark.parametrize(
    ("scale", "ratio"), [((0.2, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.3, 3.0)), ((1.0, 1.0), (2.0, 3.0))]
)
def test_crop_boxes_follow_torchvisions_rule(scale, ratio):
    u = np.random.default_rng(1).random((300, 40))
    boxes = crop_boxes(u, 256, scale, ratio)
    reference = np.array([_crop_reference(row, 256, scale, ratio) for row in u])
    np.testing.assert_allclose(boxes, reference, rtol=1e-12, atol=1e-9)
    x0, y0, w, h = boxes.T
    assert (
        (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 256 + 1e-9).all() and (y0 + h <= 256 + 1e-9).all()
    )
    if ratio == (2.0, 3.0):  # no try can fit a square patch: the centred fallback
        np.testing.assert_array_equal(boxes, np.tile([0.0, 0.0, 256.0, 256.0], (300, 1)))
    else:
        assert (w * h >= scale[0] * 256 * 256 * 0.999).all()


def _matrix_reference(u_row, cfg: AugmentConfig, size: int, out: int) -> np.ndarray:
    """A view's geometry from its uniforms, in plain floats: crop box, then R90^k, flips and the affine
    applied to the identity, then the output square mapped onto the box."""
    x0, y0, w, h = _crop_reference(u_row[:40], size, cfg.crop_scale, cfg.crop_ratio)
    rot_u, h_u, v_u, aff_u, ang_u, sh1_u, sh2_u, sc1_u, sc2_u = u_row[40:49]
    lin = np.eye(2)
    for _ in range(int(rot_u * 4) if cfg.rot90 else 0):
        lin = np.array([[0.0, -1.0], [1.0, 0.0]]) @ lin
    if h_u < cfg.hflip:
        lin = np.diag([-1.0, 1.0]) @ lin
    if v_u < cfg.vflip:
        lin = np.diag([1.0, -1.0]) @ lin
    if cfg.affine_prob > 0 and aff_u < cfg.affine_prob:
        a = math.radians(-cfg.affine_rotate_deg + 2 * cfg.affine_rotate_deg * ang_u)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        s = cfg.affine_shear
        shear = np.array([[1.0, -s + 2 * s * sh1_u], [-s + 2 * s * sh2_u, 1.0]])
        lo, hi = cfg.affine_scale
        lin = rot @ shear @ np.diag([lo + (hi - lo) * sc1_u, lo + (hi - lo) * sc2_u]) @ lin
    # p_in = centre + diag(w, h) @ lin @ (p_out / out - 0.5)
    a = np.diag([w, h]) @ lin / out
    centre = np.array([x0 + w / 2, y0 + h / 2])
    return np.concatenate([a, (centre - a @ [out / 2, out / 2])[:, None]], axis=1)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(),
        replace(preset("moco_study"), affine_prob=0.7),
        AugmentConfig(channel_dropout=0.3, sensor_dropout=0.5, blur_prob=0.4, jitter_prob=0.6),
        AugmentConfig.none(),
    ],
)
def test_a_batch_draw_equals_the_rules_applied_row_by_row(cfg):
    channels, slices = 12, {"s1": slice(0, 2), "s2": slice(2, 12)}
    u = np.random.default_rng(2).random((200, uniform_count(channels)))
    got = draw_views(u, cfg, channels, slices, 256, 224)
    assert got.matrix.dtype == got.gain.dtype == got.sigma.dtype == np.float32
    for i, row in enumerate(u):
        np.testing.assert_allclose(got.matrix[i], _matrix_reference(row, cfg, 256, 224), rtol=1e-6, atol=1e-4)
        rest = row[GEOMETRY_UNIFORMS:]
        jittered = cfg.jitter_prob > 0 and rest[0] < cfg.jitter_prob
        g, o = rest[1 : 1 + channels], rest[1 + channels : 1 + 2 * channels]
        if not cfg.jitter_per_band:  # one gain and one offset for the view: the first band's numbers
            g, o = np.full(channels, g[0]), np.full(channels, o[0])
        gain = cfg.gain[0] + (cfg.gain[1] - cfg.gain[0]) * g if jittered else np.ones(channels)
        offset = cfg.offset[0] + (cfg.offset[1] - cfg.offset[0]) * o if jittered else np.zeros(channels)
        mask = np.ones(channels)
        if cfg.channel_dropout > 0:
            mask[rest[25:37] < cfg.channel_dropout] = 0
        if cfg.sensor_dropout > 0 and rest[37] < cfg.sensor_dropout:
            mask[list(slices.values())[int(rest[38] * 2)]] = 0
        if not mask.any():
            mask[:] = 1
        np.testing.assert_allclose(got.gain[i], (gain * mask).astype(np.float32))
        np.testing.assert_allclose(got.offset[i], (offset * mask).astype(np.float32))
        blurred = cfg.blur_prob > 0 and rest[39] < cfg.blur_prob
        sigma = (
            cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * rest[40]
            if blurred
            else NO_BLUR_SIGMA
        )
        assert got.sigma[i] == np.float32(sigma)
    with pytest.raises(ValueError, match="uniforms per sample"):
        draw_views(u[:, :-1], cfg, channels, slices, 256, 224)


def _view_set(mode: str) -> ViewSet:
    inputs = {"single": "s1s2", "multicrop": "s1", "temporal": "s2"}.get(mode, "s1s2")
    return ViewSet(ViewConfig(mode=mode, inputs=InputSpec.parse(inputs, "land"), n_local=3))


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_holds_each_samples_own_draw_whatever_the_batch(mode):
    """What makes a view independent of ranks, readers and resumes: a position's parameters are the same
    drawn in any batch or alone."""
    views = _view_set(mode)
    positions = np.array([3, 90, 4, 1_000_000, 7])
    batch = views.draw_batch(11, 2, positions)
    shuffled = views.draw_batch(11, 2, positions[::-1])
    assert len(batch) == len(views.views)
    for i, p in enumerate(positions):
        alone = views.draw(11, 2, int(p))
        for v, params in enumerate(batch):
            for name in ("matrix", "gain", "offset", "sigma"):
                np.testing.assert_array_equal(getattr(params, name)[i], getattr(alone[v], name))
                np.testing.assert_array_equal(getattr(params, name)[i], getattr(shuffled[v], name)[-1 - i])
    for i in range(len(positions)):  # views of one recipe (drawn together) still each have their own
        distinct = {params.matrix[i].tobytes() for params in batch}
        assert len(distinct) == (1 if mode == "pair" else len(batch))  # pair: one geometry, shared
        assert all(params.matrix.flags.c_contiguous and params.gain.flags.c_contiguous for params in batch)
    other_epoch = views.draw_batch(11, 3, positions)
    assert not np.array_equal(other_epoch[0].matrix, batch[0].matrix)


def test_mode_choices_follow_their_probabilities():
    positions = np.arange(3000)
    partial = ViewSet(ViewConfig(mode="fusion_partial", partial_probs=(0.2, 0.3, 0.5)))
    gain = partial.draw_batch(0, 0, positions)[0].gain
    s1_on, s2_on = (gain[:, :2] != 0).any(axis=1), (gain[:, 2:] != 0).any(axis=1)
    for got, want in (
        ((s1_on & ~s2_on).mean(), 0.2),
        ((~s1_on & s2_on).mean(), 0.3),
        ((s1_on & s2_on).mean(), 0.5),
    ):
        assert abs(got - want) < 0.04, (got, want)
    optional = ViewSet(ViewConfig(mode="fusion_optional", optional_drop=0.4))
    for view in optional.draw_batch(0, 0, positions):
        s1_on, s2_on = (view.gain[:, :2] != 0).any(axis=1), (view.gain[:, 2:] != 0).any(axis=1)
        assert abs((s1_on & s2_on).mean() - 0.6) < 0.04
        assert abs((s1_on & ~s2_on).mean() - 0.2) < 0.03 and abs((~s1_on & s2_on).mean() - 0.2) < 0.03
