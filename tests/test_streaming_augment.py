"""The DALI graph (CPU mode) against NumPy references on deterministic parameters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

from eossl.streaming.augment import (
    NO_BLUR_SIGMA,
    PRESETS,
    AugmentConfig,
    draw_view,
    draw_views,
    geometry_matrix,
    preset,
    uniform_count,
)
from eossl.streaming.dali_pipeline import augment_view, channel_runs, select_channels, standardise
from eossl.streaming.inputs import InputSpec
from eossl.streaming.views import ViewConfig, ViewSet

RNG = np.random.default_rng(0)
IMAGE = RNG.normal(size=(256, 256, 5)).astype(np.float32)
S2_RAW = RNG.integers(0, 10000, size=(256, 256, 3), dtype=np.uint16)


def _run_view(image: np.ndarray, matrix, gain, offset, sigma, size: int) -> np.ndarray:
    def source(_info):
        return (
            image,
            matrix.astype(np.float32),
            gain.astype(np.float32),
            offset.astype(np.float32),
            np.array(sigma, np.float32),
        )

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        x, m, g, o, s = fn.external_source(
            source=source, num_outputs=5, batch=False, layout=["HWC", "", "", "", ""]
        )
        return augment_view(x, m, g, o, s, size)

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.array(out.as_tensor())[0]


def _identity_params(c: int):
    return np.ones(c), np.zeros(c), NO_BLUR_SIGMA


@pytest.mark.parametrize(
    "linear, reference",
    [
        (np.eye(2), lambda x: x),
        (np.diag([-1.0, 1.0]), lambda x: x[:, ::-1]),  # horizontal flip
        (np.diag([1.0, -1.0]), lambda x: x[::-1, :]),  # vertical flip
        (np.array([[0.0, -1.0], [1.0, 0.0]]), lambda x: np.rot90(x, k=1, axes=(0, 1))),
        (np.array([[-1.0, 0.0], [0.0, -1.0]]), lambda x: x[::-1, ::-1]),
    ],
)
def test_flips_and_rotations_are_exact_pixel_permutations(linear, reference):
    matrix = geometry_matrix((0, 0, 256, 256), 256, linear)
    out = _run_view(IMAGE, matrix, *_identity_params(5), 256)
    np.testing.assert_allclose(out, reference(IMAGE), atol=1e-5)


def test_crop_resize_matches_bilinear_reference():
    # An exact 2x downsample of the top-left quadrant... use a crop of the left half at full resolution:
    matrix = geometry_matrix((64, 32, 128, 128), 128, np.eye(2))
    out = _run_view(IMAGE, matrix, *_identity_params(5), 128)
    np.testing.assert_allclose(out, IMAGE[32:160, 64:192], atol=1e-5)
    # 2x downsampling: output pixel centres fall between 2x2 input pixels -> their mean (bilinear).
    matrix = geometry_matrix((0, 0, 256, 256), 128, np.eye(2))
    out = _run_view(IMAGE, matrix, *_identity_params(5), 128)
    ref = IMAGE.reshape(128, 2, 128, 2, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(out[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-4)


def test_gain_offset_and_blur():
    gain = np.array([1.0, 0.0, 2.0, 0.5, 1.0])
    offset = np.array([0.0, 0.0, 1.0, -1.0, 0.0])
    matrix = geometry_matrix((0, 0, 256, 256), 256, np.eye(2))
    out = _run_view(IMAGE, matrix, gain, offset, NO_BLUR_SIGMA, 256)
    np.testing.assert_allclose(out, IMAGE * gain + offset, atol=1e-5)
    assert not out[..., 1].any()  # gain 0 drops a channel
    blurred = _run_view(IMAGE, matrix, np.ones(5), np.zeros(5), 2.0, 256)
    # Blur keeps the per-channel mean (away from borders) and cuts the variance of white noise.
    assert blurred[..., 0].std() < 0.4 * IMAGE[..., 0].std()
    np.testing.assert_allclose(
        blurred[20:-20, 20:-20].mean(axis=(0, 1)), IMAGE[20:-20, 20:-20].mean(axis=(0, 1)), atol=0.02
    )


def test_standardise_uint16_and_clip():
    mean = np.array([100.0, 200.0, 300.0], np.float32)
    std = np.array([10.0, 20.0, 30.0], np.float32)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        s2 = fn.external_source(source=lambda _i: S2_RAW, batch=False, layout="HWC")
        s1 = fn.external_source(source=lambda _i: IMAGE[..., :2] * 20 - 10, batch=False, layout="HWC")
        return (
            standardise(s2, mean, std),
            standardise(s1, np.zeros(2, np.float32), np.ones(2, np.float32), clip=(-25.0, 0.0)),
        )

    p = pipe()
    p.build()
    a, b = (np.array(t.as_tensor())[0] for t in p.run())
    np.testing.assert_allclose(a, (S2_RAW.astype(np.float64) - mean) / std, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b, np.clip(IMAGE[..., :2] * 20 - 10, -25, 0), atol=1e-5)


@pytest.mark.parametrize("bands", ["land", "rgb", "all", "B8A,B2,B3,B12"])
def test_band_selection_in_the_graph_equals_numpy_take(bands):
    """The reader hands every stored S2 band over; the graph's channel slices pick the view's bands."""
    stored = RNG.integers(0, 10000, size=(2, 16, 16, 13), dtype=np.uint16)
    index = InputSpec.parse("s2", bands).s2_index

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        x = fn.external_source(source=lambda: stored, batch=True, layout="HWC")
        return select_channels(x, index, 13)

    p = pipe()
    p.build()
    (out,) = p.run()
    np.testing.assert_array_equal(np.stack([np.array(t) for t in out]), np.take(stored, index, axis=3))
    assert channel_runs(InputSpec.parse("s2", "land").s2_index, 13) == [(1, 9), (11, 13)]
    assert channel_runs(np.arange(13), 13) == []  # every band in order: no copy at all


def test_view_params_dropout_and_identity():
    cfg = AugmentConfig(channel_dropout=0.5, jitter_prob=0.0)
    rng = np.random.default_rng(3)
    params = [draw_view(rng, cfg, 12, {"s1": slice(0, 2), "s2": slice(2, 12)}, 256, 224) for _ in range(50)]
    dropped = np.array([(p.gain == 0).mean() for p in params])
    assert 0.3 < dropped.mean() < 0.7 and all((p.gain > 0).any() for p in params)
    sensor = AugmentConfig(sensor_dropout=1.0, jitter_prob=0.0)
    for _ in range(20):
        p = draw_view(rng, sensor, 12, {"s1": slice(0, 2), "s2": slice(2, 12)}, 256, 224)
        assert (not p.gain[:2].any() and p.gain[2:].all()) or (p.gain[:2].all() and not p.gain[2:].any())
    ident = draw_view(rng, AugmentConfig.none(), 3, {"s2": slice(0, 3)}, 256, 256)
    np.testing.assert_allclose(ident.matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    assert ident.sigma == np.float32(NO_BLUR_SIGMA) and (ident.gain == 1).all() and not ident.offset.any()


def test_moco_study_preset_has_no_crop_and_shares_brightness_contrast_across_bands():
    cfg = preset("moco_study")
    rng = np.random.default_rng(5)
    jittered = blurred = distorted = 0
    for _ in range(200):
        p = draw_view(rng, cfg, 12, {"s1": slice(0, 2), "s2": slice(2, 12)}, 256, 256)
        linear = p.matrix[:, :2].astype(np.float64)
        # Without a crop the output square maps onto the whole patch, up to a flip (|entries| == 1) or
        # the small affine (scale 0.9-1.1, shear 0.1, rotation 10 degrees).
        axis_aligned = np.allclose(np.abs(linear), np.eye(2), atol=1e-6)
        distorted += not axis_aligned
        if axis_aligned:
            np.testing.assert_allclose(linear @ [128, 128] + p.matrix[:, 2], [128, 128], atol=1e-4)
        assert np.abs(linear).max() < 1.6 and np.abs(np.linalg.det(linear)) > 0.6
        assert (p.gain == p.gain[0]).all() and (p.offset == p.offset[0]).all()  # one gain, one offset
        jittered += p.gain[0] != 1
        blurred += float(p.sigma) > NO_BLUR_SIGMA
    # each op with probability 0.5 (200 draws: 100 +- 7 each)
    assert all(60 < n < 140 for n in (jittered, blurred, distorted)), (jittered, blurred, distorted)
    with pytest.raises(ValueError, match="default, moco_study"):
        preset("simclr")
    assert preset("default") == AugmentConfig() and PRESETS == ("default", "moco_study")


def test_per_band_and_shared_jitter_read_the_same_uniforms():
    """The jitter option changes only the jitter: one gain/offset for every band is the per-band draw's
    first, and the geometry, mask and blur of the view are the same numbers."""
    u = np.random.default_rng(9).random((20, uniform_count(5)))
    slices = {"s2": slice(0, 5)}
    per_band = draw_views(u, AugmentConfig(jitter_prob=1.0), 5, slices, 256, 224)
    shared = draw_views(u, AugmentConfig(jitter_prob=1.0, jitter_per_band=False), 5, slices, 256, 224)
    assert all(len(set(g.tolist())) == 5 for g in per_band.gain)
    np.testing.assert_array_equal(shared.gain, np.repeat(per_band.gain[:, :1], 5, axis=1))
    np.testing.assert_array_equal(shared.offset, np.repeat(per_band.offset[:, :1], 5, axis=1))
    np.testing.assert_array_equal(shared.matrix, per_band.matrix)
    np.testing.assert_array_equal(shared.sigma, per_band.sigma)


def test_pair_geometry_shared_or_independent():
    both = InputSpec.parse("s1s2", "land")
    for geometry, same in (("shared", True), ("independent", False)):
        views = ViewSet(
            ViewConfig(mode="pair", inputs=both, augment=preset("moco_study"), pair_geometry=geometry)
        )
        equal = [np.array_equal(*(p.matrix for p in views.draw(0, 0, i))) for i in range(40)]
        if same:
            assert all(equal)
        else:  # independent flips/affine: equal only when both draws happen to agree (p ~ 1/8 here)
            assert sum(equal) < 20


def test_dino_global_crops_are_blurred_asymmetrically():
    views = ViewSet(ViewConfig(mode="multicrop", inputs=InputSpec.parse("s1", "land"), n_local=8))
    assert len(views.views) == 10  # DINO's code default: 2 global + 8 local crops
    sigmas = np.array([[float(p.sigma) for p in views.draw(0, 0, i)] for i in range(300)])
    rate = (sigmas > NO_BLUR_SIGMA).mean(axis=0)
    assert rate[0] == 1.0  # the first global crop is always blurred
    assert 0.05 < rate[1] < 0.17  # the second rarely (p = 0.1)
    assert all(0.4 < r < 0.6 for r in rate[2:])  # local crops: p = 0.5
    plain = ViewSet(
        ViewConfig(mode="multicrop", inputs=InputSpec.parse("s1", "land"), augment=AugmentConfig.none())
    )
    assert all(float(p.sigma) == np.float32(NO_BLUR_SIGMA) for p in plain.draw(0, 0, 0))
    with pytest.raises(ValueError, match="probabilities"):
        ViewConfig(mode="multicrop", global_blur=(1.5, 0.1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moco_study_views_in_dali_equal_the_torch_reference(seed):
    """The distorted, jittered, blurred views of the study's preset: DALI CPU mode == torch reference."""
    torch = pytest.importorskip("torch")
    from eossl.launch.bench.geotiff_baseline import torch_view

    cfg = replace(preset("moco_study"), affine_prob=1.0, blur_prob=1.0, jitter_prob=1.0)
    p = draw_view(np.random.default_rng(seed), cfg, 5, {"s2": slice(0, 5)}, 256, 224)
    got = _run_view(IMAGE, p.matrix, p.gain, p.offset, p.sigma, 224)
    ref = torch_view(torch.from_numpy(IMAGE).permute(2, 0, 1).contiguous(), p, 224).permute(1, 2, 0).numpy()
    assert (got == 0).any() or not np.allclose(p.matrix[:, :2], np.eye(2))  # the affine moved pixels
    np.testing.assert_allclose(got, ref, atol=2e-2)
    assert np.abs(got - ref).mean() < 2e-3
