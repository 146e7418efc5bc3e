"""The baseline of ``eossl bench loader``: per-patch GeoTIFFs read with rasterio, torch ops, a DataLoader.

What people use today: each sample's S1 and S2 GeoTIFFs opened on every access, NaN fill, clip and
standardisation with torch ops on whole tensors, and (for the augment stage) the loader's *same* view
parameters (``ViewSet.draw``) applied with torch (``torch_view``): ``affine_grid``/``grid_sample``,
per-band gain/offset, ``torchvision`` Gaussian blur with DALI's window. Given the same position, its
values agree with the loader's (tested), so the bench compares the same work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.errors
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from eossl.ingest.bands import PATCH_SIZE
from eossl.ingest.layout import scan_source
from eossl.streaming.augment import NO_BLUR_SIGMA, ViewParams
from eossl.streaming.inputs import InputSpec
from eossl.streaming.torch_workers import torch_loader
from eossl.streaming.views import ViewSet

from .harness import Epochs

__all__ = ["GeoTiffPatches", "dataloader_epochs", "gdal_s3_options", "geotiff_files", "torch_view"]


def torch_view(x: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """One augmented view with torch, the same maths as ``dali_pipeline.augment_view``.

    Args:
        x: (C, H, W) standardised float32 patch.
        p: the view's parameters; ``p.matrix`` maps output pixel coordinates to input pixel coordinates
            (continuous, pixel centres at +0.5).
        size: output side in pixels.
    """
    c, h, w = x.shape
    m = torch.from_numpy(p.matrix).double()
    # pixel -> normalised (align_corners=False): n = 2 p / S - 1, so p_out = (n_out + 1) S_out / 2 and
    # n_in = 2 (M p_out) / S_in - 1.
    to_in = torch.tensor([[2.0 / w, 0.0], [0.0, 2.0 / h]], dtype=torch.float64)
    linear = to_in @ m[:, :2] * (size / 2)
    shift = to_in @ (m[:, :2] @ torch.full((2,), size / 2, dtype=torch.float64) + m[:, 2]) - 1
    theta = torch.cat([linear, shift[:, None]], dim=1).float()[None]
    grid = F.affine_grid(theta, [1, c, size, size], align_corners=False)
    y = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    y = y * torch.from_numpy(p.gain)[:, None, None] + torch.from_numpy(p.offset)[:, None, None]
    sigma = float(p.sigma)
    if sigma > NO_BLUR_SIGMA:
        k = 2 * math.ceil(3 * sigma) + 1  # DALI's window for a given sigma
        y = gaussian_blur(y, kernel_size=[k, k], sigma=[sigma, sigma])
    return y


class GeoTiffPatches(torch.utils.data.Dataset):
    """What people use today: open each sample's S1 and S2 GeoTIFFs with rasterio on every access.

    Item ``i`` is the standardised (C, 256, 256) float32 patch (``views`` is None), or the tuple of its
    augmented views with parameters ``views.draw(seed, 0, i)``. Paths may be ``s3://`` URLs, opened by GDAL
    (``/vsis3/``) with ``gdal_options`` (see ``gdal_s3_options``).
    """

    def __init__(
        self,
        files: list[tuple[str, str]],
        spec: InputSpec,
        mean: np.ndarray,
        std: np.ndarray,
        views: ViewSet | None = None,
        seed: int = 0,
        gdal_options: dict[str, str] | None = None,
    ):
        self.files = files
        self.gdal_options = gdal_options or {}
        self.s2_bands = [int(i) + 1 for i in spec.s2_index]  # rasterio band indexes are 1-based
        self.clip = spec.s1_clip
        self.mean = torch.from_numpy(mean)[:, None, None]
        self.std = torch.from_numpy(std)[:, None, None]
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> torch.Tensor:
        """Standardised (C, H, W) float32: GDAL converts into one preallocated array, torch ops in place."""
        s1_path, s2_path = self.files[i]
        out = np.empty((2 + len(self.s2_bands), PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
        with rasterio.Env(**self.gdal_options):
            for path, bands, target in ((s1_path, None, out[:2]), (s2_path, self.s2_bands, out[2:])):
                try:
                    with rasterio.open(path) as ds:
                        ds.read(bands, out=target)
                except rasterio.errors.RasterioError as exc:  # GDAL's message may not name the file
                    raise OSError(f"{path}: cannot read GeoTIFF: {exc}") from exc
        x = torch.from_numpy(out)
        s1 = x[:2]
        torch.where(torch.isfinite(s1), s1, self.mean[:2], out=s1)  # as the loader: NaN -> band mean
        if self.clip is not None:
            s1.clamp_(*self.clip)
        return x.sub_(self.mean).div_(self.std)

    def __getitem__(self, i: int):
        x = self.read(i)
        if self.views is None:
            return x
        params = self.views.draw(self.seed, 0, i)
        return tuple(torch_view(x, p, v.size) for p, v in zip(params, self.views.views, strict=True))


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def gdal_s3_options(timeout_s: float = 30.0, retries: int = 5) -> dict[str, str]:
    """GDAL settings for ``rasterio.open("s3://...")`` from the standard AWS environment.

    GDAL does not read ``AWS_ENDPOINT_URL``: a custom endpoint becomes ``AWS_S3_ENDPOINT`` with path-style
    addressing. ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` is GDAL's own advice for cloud reads (without it
    every open also lists the folder, looking for sidecar files); timeouts and retries so that no read
    hangs. Credentials stay in the environment, where GDAL finds them.
    """
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_TIMEOUT": str(math.ceil(timeout_s)),
        "GDAL_HTTP_CONNECTTIMEOUT": str(math.ceil(timeout_s)),
        "GDAL_HTTP_MAX_RETRY": str(retries),
        "GDAL_HTTP_RETRY_DELAY": "0.5",
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint)
        options.update(
            AWS_S3_ENDPOINT=url.netloc + url.path.rstrip("/"),
            AWS_HTTPS="YES" if url.scheme == "https" else "NO",
            AWS_VIRTUAL_HOSTING="FALSE",
        )
    return options


def geotiff_files(source: str, keys: np.ndarray) -> list[tuple[str, str]]:
    """(s1, s2) GeoTIFF paths of each catalog key, found in the SEN12MS tree ``source``."""
    found = {g.key: g.files for g in scan_source(source).groups}
    out = []
    for key in keys.tolist():
        files = found.get(key, {})
        if "s1" not in files or "s2" not in files:
            raise ValueError(
                f"{source}: no s1/s2 GeoTIFFs for dataset sample {key!r} (is this the ingest source?)"
            )
        out.append((files["s1"][0], files["s2"][0]))
    return out


@contextmanager
def dataloader_epochs(dataset: GeoTiffPatches, workers: int, batch_size: int) -> Iterator[Epochs]:
    dl = torch_loader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        workers=workers,
        worker_init_fn=_one_thread if workers else None,
        persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers else None,
    )  # no fork of DALI threads
    yield lambda: sum(len(b) if isinstance(b, torch.Tensor) else len(b[0]) for b in dl)
