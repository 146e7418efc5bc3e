"""torch's views (CPU mode) against DALI's graph and against float64 NumPy references."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from eossl.streaming.augment import NO_BLUR_SIGMA, draw_view, geometry_matrix, preset
from eossl.streaming.dali_pipeline import augment_view
from eossl.streaming.torch_augment import augment_batch, blur_batch

RNG = np.random.default_rng(7)


def _constant(value):
    return lambda: value


def _dali_views(images: np.ndarray, params: list, size: int) -> np.ndarray:
    """(B, size, size, C) views of HWC ``images`` by the DALI graph in CPU mode."""
    stacked = [np.stack([getattr(p, name) for p in params]) for name in ("matrix", "gain", "offset", "sigma")]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        x = fn.external_source(source=_constant(images), batch=True, layout="HWC")
        m, g, o, s = (fn.external_source(source=_constant(a), batch=True) for a in stacked)
        return augment_view(x, m, g, o, s, size)

    p = pipe()
    p.build()
    return np.array(p.run()[0].as_tensor())


def _torch_views(images: np.ndarray, params: list, size: int) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # channels-last strides, as the loader hands them
    args = [torch.from_numpy(np.stack([getattr(p, n) for p in params])) for n in ("matrix", "gain", "offset")]
    sigma = torch.from_numpy(np.stack([p.sigma for p in params]))
    out = augment_batch(x, *args, sigma, size)
    assert out.shape == (len(images), images.shape[3], size, size) and out.is_contiguous()
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "name, channels, size, blur",
    [
        ("default", 12, 224, 0.5),
        ("default", 2, 96, 1.0),  # a DINO local crop of S1
        ("moco_study", 13, 224, 0.5),  # random affine: pixels from outside the patch filled
        ("moco_study", 10, 128, 0.0),
    ],
)
def test_views_equal_those_of_the_dali_graph(name, channels, size, blur):
    cfg = replace(preset(name), blur_prob=blur)
    if name == "moco_study":
        cfg = replace(cfg, affine_prob=1.0, jitter_prob=1.0)
    images = RNG.normal(size=(6, 256, 256, channels)).astype(np.float32)
    params = [
        draw_view(np.random.default_rng(i), cfg, channels, {"s2": slice(0, channels)}, 256, size)
        for i in range(len(images))
    ]
    sigmas = [float(p.sigma) for p in params]
    assert (blur == 0) == all(s == np.float32(NO_BLUR_SIGMA) for s in sigmas)
    ours, dali = _torch_views(images, params, size), _dali_views(images, params, size)
    np.testing.assert_allclose(ours, dali, atol=2e-2)
    assert np.abs(ours - dali).mean() < 2e-3


@pytest.mark.parametrize(
    "linear, reference",
    [
        (np.eye(2), lambda x: x),
        (np.diag([-1.0, 1.0]), lambda x: x[:, ::-1]),
        (np.diag([1.0, -1.0]), lambda x: x[::-1, :]),
        (np.array([[0.0, -1.0], [1.0, 0.0]]), lambda x: np.rot90(x, k=1, axes=(0, 1))),
    ],
)
def test_flips_rotations_and_crops_are_exact(linear, reference):
    """Identity jitter and no blur: a flip or rotation is a pixel permutation, a crop at scale 1 a slice,
    and a 2x reduction the mean of each 2 x 2 block (bilinear at the centres between pixels). To 2e-4:
    ``grid_sample``'s float32 coordinates put a pixel centre within ~1e-5 pixels (DALI: 1e-5 in value)."""
    image = RNG.normal(size=(1, 256, 256, 5)).astype(np.float32)
    plain = {"gain": np.ones(5, np.float32), "offset": np.zeros(5, np.float32), "sigma": NO_BLUR_SIGMA}

    def view(box, size, lin):
        p = type("P", (), {"matrix": geometry_matrix(box, size, lin).astype(np.float32), **plain})
        p.sigma = np.float32(p.sigma)
        return _torch_views(image, [p], size)[0]

    np.testing.assert_allclose(view((0, 0, 256, 256), 256, linear), reference(image[0]), atol=2e-4)
    np.testing.assert_allclose(view((64, 32, 128, 128), 128, np.eye(2)), image[0, 32:160, 64:192], atol=2e-4)
    halved = image[0].reshape(128, 2, 128, 2, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(view((0, 0, 256, 256), 128, np.eye(2)), halved, atol=2e-4)


def _blur_reference(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Float64 separable Gaussian: window 2 ceil(3 sigma) + 1, normalised; border mirrored without
    repeating the edge pixel (x[-1] = x[1])."""
    r = math.ceil(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = plane.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in range(2)], mode="reflect")
        out = sum(
            t * np.take(padded, np.arange(k, k + plane.shape[axis]), axis=axis) for k, t in enumerate(taps)
        )
    return out


def test_blur_uses_each_samples_own_window_and_mirrors_the_border():
    x = RNG.normal(size=(3, 2, 40, 48)).astype(np.float32)
    sigma = np.array([0.4, 1.9, 1.0], np.float32)  # windows of 5, 13 and 7 taps in one call
    got = blur_batch(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    for i in range(3):
        for c in range(2):
            np.testing.assert_allclose(got[i, c], _blur_reference(x[i, c], float(sigma[i])), atol=1e-5)
    with pytest.raises(ValueError, match="larger than 8x8"):
        blur_batch(torch.zeros(1, 1, 8, 8), torch.tensor([3.0]))


def test_threads_share_the_samples_and_leave_the_callers_torch_threads_alone():
    """The loader's pool: the same views, bit for bit, as one thread; its threads run torch on one OpenMP
    thread each while the caller (the training loop) keeps its own count."""
    from eossl.streaming.torch_augment import single_thread_pool

    cfg = preset("default")
    images = RNG.normal(size=(5, 256, 256, 4)).astype(np.float32)
    params = [draw_view(np.random.default_rng(i), cfg, 4, {"s2": slice(0, 4)}, 256, 64) for i in range(5)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    args = [torch.from_numpy(np.stack([getattr(p, n) for p in params])) for n in ("matrix", "gain", "offset")]
    sigma = torch.from_numpy(np.stack([p.sigma for p in params]))
    before = torch.get_num_threads()  # the suite runs torch on one thread: give the caller two
    torch.set_num_threads(2)
    try:
        with single_thread_pool(3) as pool:
            threaded = augment_batch(x, *args, sigma, 64, pool=pool)
            assert set(pool.map(lambda _: torch.get_num_threads(), range(6))) == {1}
        assert torch.get_num_threads() == 2
        assert torch.equal(threaded, augment_batch(x, *args, sigma, 64))
    finally:
        torch.set_num_threads(before)
