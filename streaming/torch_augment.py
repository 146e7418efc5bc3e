"""The views' augmentation with torch kernels, a whole batch per call: what CPU mode runs.

DALI's graph (``dali_pipeline.augment_view``) is what a GPU runs. Its CPU operators are generic and slow:
measured on one core for one 12 x 224 x 224 view, ``warp_affine`` costs ~15 ms against ~1.4 ms for torch's
``grid_sample`` on the same channels-last data, and ``gaussian_blur`` ~8 ms even when sigma makes it an
identity (docs/BENCHMARKS.md). So in CPU mode DALI reads, selects bands and standardises, and this module
makes the views from the same parameters with the same maths:

- one bilinear resampling per view through ``matrix`` (output pixel -> input pixel, pixel centres at
  +0.5), zeros outside the patch (the band mean once standardised), as ``warp_affine(inverse_map=True)``;
- per-band ``gain`` and ``offset``;
- a Gaussian blur of the samples whose ``sigma`` exceeds ``NO_BLUR_SIGMA``: DALI's window (``2 ceil(3
  sigma) + 1`` taps, normalised), separable, mirrored at the border without repeating the edge pixel
  (DALI's ``reflect 101``). Samples below it are left alone, which DALI's 3-tap identity equals exactly.

Tests hold both implementations to each other view by view (tests/test_streaming_torch_augment.py).
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .augment import NO_BLUR_SIGMA

__all__ = ["augment_batch", "blur_batch", "single_thread_pool", "theta_from_pixel_matrix"]


def theta_from_pixel_matrix(matrix: torch.Tensor, in_hw: tuple[int, int], size: int) -> torch.Tensor:
    """(B, 2, 3) pixel-coordinate maps (output -> input) as ``affine_grid``'s normalised ``theta``.

    ``affine_grid`` with ``align_corners=False`` works in normalised coordinates n = 2 p / S - 1 (p in
    pixels, centres at +0.5), so p_out = (n_out + 1) S_out / 2 and n_in = 2 (M p_out) / S_in - 1.
    Computed in float64: the shift is a difference of numbers of the patch's size.
    """
    h, w = in_hw
    m = matrix.to(torch.float64)
    to_in = torch.tensor([[2.0 / w, 0.0], [0.0, 2.0 / h]], dtype=torch.float64)
    linear = to_in @ m[:, :, :2] * (size / 2)
    centre = torch.full((2, 1), size / 2, dtype=torch.float64)
    shift = to_in @ (m[:, :, :2] @ centre + m[:, :, 2:]) - 1
    return torch.cat([linear, shift], dim=2).to(torch.float32)


def _gaussian_taps(sigma: torch.Tensor) -> torch.Tensor:
    """(n, 2R + 1) normalised 1-D Gaussian windows, R the largest radius: each sample's own window is
    ``2 ceil(3 sigma) + 1`` taps (DALI's); taps beyond it are 0, so every sample keeps its own kernel."""
    radius = torch.ceil(3 * sigma.to(torch.float64)).to(torch.int64)
    r = int(radius.max())
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    s = sigma.to(torch.float64)[:, None]
    weights = torch.exp(-0.5 * (taps[None] / s) ** 2) * (taps.abs()[None] <= radius[:, None])
    return (weights / weights.sum(dim=1, keepdim=True)).to(torch.float32)


def blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each (C, H, W) sample of ``x`` blurred with its own ``sigma`` (all > 0), channels independent.

    One grouped convolution per axis over the whole batch: the samples' channels become the groups, each
    with its sample's taps.
    """
    n, c, h, w = x.shape
    taps = _gaussian_taps(sigma)  # (n, K)
    k = taps.shape[1]
    r = k // 2
    if r >= min(h, w):
        raise ValueError(f"blur sigma up to {float(sigma.max()):.3g} needs a view larger than {h}x{w}")
    weights = taps.repeat_interleave(c, dim=0)  # (n*C, K): a sample's channels share its taps
    planes = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    # channels-last: torch's depthwise 1 x K convolution is ~2-3x faster in it than on NCHW planes
    planes = planes.contiguous(memory_format=torch.channels_last)
    planes = F.conv2d(planes, weights.view(n * c, 1, 1, k), groups=n * c)
    planes = F.conv2d(planes, weights.view(n * c, 1, k, 1), groups=n * c)
    return planes.view(n, c, h, w)


def augment_batch(
    x: torch.Tensor,
    matrix: torch.Tensor,
    gain: torch.Tensor,
    offset: torch.Tensor,
    sigma: torch.Tensor,
    size: int,
    pool: Executor | None = None,
) -> torch.Tensor:
    """One view of every sample of a batch.

    Sample by sample: a batch-wide sampling grid (B x size x size x 2 floats) and output no longer fit in
    the CPU's cache, which made one batched ``grid_sample`` ~2x slower per view than a loop.

    Args:
        x: (B, C, H, W) standardised float32 samples; channels-last memory format is the fast one.
        matrix: (B, 2, 3) output pixel -> input pixel maps (``augment.ViewParams.matrix``).
        gain, offset: (B, C) per-band jitter.
        sigma: (B,) blur sigma; at most ``NO_BLUR_SIGMA``: no blur.
        size: output side in pixels.
        pool: threads that share the samples (``single_thread_pool``); None: this thread.

    Returns:
        (B, C, size, size) float32, contiguous (NCHW).
    """
    b, c, h, w = x.shape
    theta = theta_from_pixel_matrix(matrix, (h, w), size)
    gain = gain.to(torch.float32)[:, :, None, None]
    offset = offset.to(torch.float32)[:, :, None, None]
    out = torch.empty((b, c, size, size), dtype=torch.float32)

    def one(i: int) -> None:  # writes sample i's view only: threads never share memory
        grid = F.affine_grid(theta[i : i + 1], [1, c, size, size], align_corners=False)
        y = F.grid_sample(x[i : i + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        view = out[i : i + 1]
        torch.mul(y, gain[i], out=view).add_(offset[i])
        if sigma[i] > NO_BLUR_SIGMA:
            view.copy_(blur_batch(view, sigma[i : i + 1]))

    if pool is None:
        for i in range(b):
            one(i)
    else:
        list(pool.map(one, range(b)))
    return out


def single_thread_pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` threads for ``augment_batch``, each running torch's kernels on one OpenMP thread.

    The samples of a batch are independent, so they are spread over threads rather than each kernel over
    cores: a training process runs torch with one OpenMP thread per core, and those threads spin while
    they wait; on a busy machine a view cost ~4x the CPU that way (docs/BENCHMARKS.md). torch's thread
    count is per thread under OpenMP, so the caller's own setting is left alone.
    """
    return ThreadPoolExecutor(
        max(threads, 1), thread_name_prefix="eossl-augment", initializer=torch.set_num_threads, initargs=(1,)
    )
