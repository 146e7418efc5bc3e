"""The DALI graph: standardise each sensor once, then resample, jitter and blur every view.

Processing is plain functions of DataNodes (``standardise``, ``augment_view``); ``build_pipeline`` is the
thin ``@pipeline_def`` wrapper that binds them to the sample source. The same graph runs on the GPU
(``device="gpu"``) and in DALI's CPU mode (``device_id=None``), which is what CI exercises.

The reader hands S2 over with every stored band; ``select_channels`` picks the view's bands here (channel
slices, concatenated), which costs nothing on the GPU and, in CPU mode, runs in DALI's C++ threads.

Only operators that DALI supports for any channel count and float input are used: ``math.clamp``,
``crop_mirror_normalize`` (per-channel mean/std, no layout change), ``cat``, ``warp_affine`` (all geometry
in one resampling), arithmetic (per-band gain/offset; a zero gain drops a channel) and
``gaussian_blur`` (per-sample sigma). No colour operator: ``color_twist``/``hsv`` assume RGB and crash on
2-channel data. Views stay HWC (a transpose costs 3x); the loader hands PyTorch NCHW *views* with
channels-last strides, which is the memory format convolutions want anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eossl.ingest.bands import S2

from .shared_readers import SharedMemoryReaders
from .source import source_outputs
from .views import ViewSet

# DALI is an install extra per CUDA major (the wheels differ in the NVIDIA driver they need), so a plain
# `pip install eossl` has no loader: say which extra to install instead of a bare ModuleNotFoundError.
DALI_MISSING = (
    "the eossl loader needs NVIDIA DALI (on the GPU and in its CPU mode), which is not importable here. "
    "Install the build that matches the NVIDIA driver (`nvidia-smi` shows its version): "
    "pip install 'eossl[cuda13]' (CUDA 13, driver >= 580) or pip install 'eossl[cuda12]' "
    "(CUDA 12, driver >= 525.60); on a machine without a GPU either works (README, Install)"
)

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as exc:
    raise ImportError(f"{DALI_MISSING} ({exc})") from exc

__all__ = [
    "DALI_MISSING",
    "DALIGenericIterator",
    "augment_view",
    "build_pipeline",
    "channel_runs",
    "external_batches",
    "select_channels",
    "standardise",
    "standardised_inputs",
    "view_inputs",
]


def channel_runs(index: np.ndarray, stored: int) -> list[tuple[int, int]]:
    """``index`` as runs [start, stop) of consecutive stored channels; [] when it is all, in order."""
    index = [int(i) for i in index]
    if index == list(range(stored)):
        return []
    runs: list[tuple[int, int]] = []
    for i in index:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def select_channels(x, index: np.ndarray, stored: int):
    """The channels ``index`` of HWC ``x`` (``stored`` channels), in that order: one slice per run of
    consecutive channels (the land bands are two runs), concatenated."""
    runs = channel_runs(index, stored)
    if not runs:
        return x
    parts = [x[:, :, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else fn.cat(*parts, axis=2)


def standardise(x, mean: np.ndarray, std: np.ndarray, clip: tuple[float, float] | None = None):
    """(x - mean) / std per channel, after optional clipping; uint16 and float32 in, float32 out."""
    if clip is not None:
        x = dmath.clamp(x, float(clip[0]), float(clip[1]))
    return fn.crop_mirror_normalize(
        x, mean=mean.tolist(), std=std.tolist(), dtype=types.FLOAT, output_layout="HWC"
    )


def augment_view(x, matrix, gain, offset, sigma, size: int):
    """One view: a single affine resampling (crop, flips, rotations, distortion), per-band jitter, blur.

    Out-of-patch pixels (only possible with the random affine) are 0, the band mean after standardising.
    """
    y = fn.warp_affine(
        x, matrix=matrix, size=[size, size], inverse_map=True, interp_type=types.INTERP_LINEAR, fill_value=0.0
    )
    y = y * gain + offset
    return fn.gaussian_blur(y, sigma=sigma)


def external_batches(source, views: ViewSet, parallel: bool):
    """The source's outputs as DataNodes: a dict sensor -> raw HWC batch (the partners' batches of the
    temporal mode as ``<sensor>@1``), the ids, the view parameters. The shared-memory readers' arrays
    are read in place (``no_copy``: they stay untouched until DALI is done with them); they come from
    their own processes, so DALI's parallel workers are not used for them."""
    in_place = isinstance(source, SharedMemoryReaders)
    names = [s if k == 0 else f"{s}@{k}" for k in range(views.sources) for s in views.sensors]
    n = source_outputs(views)
    outs = fn.external_source(
        source=source,
        num_outputs=n,
        batch=True,
        batch_info=True,
        parallel=parallel and not in_place,
        no_copy=True if in_place else None,
        layout=["HWC"] * len(names) + [""] * (n - len(names)),
    )
    return dict(zip(names, outs[: len(names)], strict=True)), outs[len(names)], outs[len(names) + 1 :]


def standardised_inputs(
    arrays: dict, views: ViewSet, norm: dict, device: str, s2_stored: Sequence[str] = S2.bands
) -> dict:
    """Sensor -> standardised float32 HWC batch: S2 band selection (``s2_stored``: the bands the dataset
    stores, in order), S1 clipping, per-channel mean/std."""
    spec = views.input_spec
    out = {}
    for name, arr in arrays.items():
        sensor = name.split("@", 1)[0]  # s2@1: a partner's S2 (temporal mode)
        if device == "gpu":
            arr = arr.gpu()
        if sensor == "s2":
            arr = select_channels(arr, spec.stored_index(s2_stored), len(s2_stored))
        out[name] = standardise(arr, *norm[sensor], spec.s1_clip if sensor == "s1" else None)
    return out


def view_inputs(views: ViewSet) -> tuple[list[tuple[int, tuple[str, ...]]], list[int]]:
    """The distinct inputs the views are made of, as (source, sensors), and each view's index among them:
    views of one input (DINO's crops, a pair's shared fusion) share one standardised batch."""
    keys: list[tuple[int, tuple[str, ...]]] = []
    index = []
    for view in views.views:
        key = (view.source, tuple(view.sensors))
        if key not in keys:
            keys.append(key)
        index.append(keys.index(key))
    return keys, index


def build_pipeline(
    source,
    views: ViewSet,
    norm: dict[str, tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    device: str,
    device_id: int | None,
    num_threads: int,
    py_workers: int,
    prefetch: int = 2,
    seed: int = 0,
    s2_stored: Sequence[str] = S2.bands,
    views_in_graph: bool = True,
):
    """Bind ``source`` (a batch callable: ``source.SampleSource``, picklable for DALI's parallel workers,
    or ``shared_readers.SharedMemoryReaders``, which runs its own) to the graph.

    ``s2_stored`` names the S2 bands the dataset stores, in order (``inputs.stored_s2_bands``): the graph
    picks the view's bands among them.

    Source outputs, in order: one HWC batch per sensor in ``views.sensors`` (S2 with every stored band),
    the int64 ids, then (matrix, gain, offset, sigma) for every view.
    Pipeline outputs: one HWC float32 batch per view, then the ids. With ``views_in_graph=False`` (CPU mode
    with torch's kernels making the views, ``torch_augment``): one standardised HWC float32 batch per
    ``view_inputs`` key, the ids, then every view's (matrix, gain, offset, sigma).
    """

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        py_num_workers=max(py_workers, 1),
        py_start_method="spawn",
        prefetch_queue_depth=prefetch,
        seed=seed,
        exec_dynamic=True,
    )
    def pipeline():
        arrays, ids, params = external_batches(source, views, parallel=py_workers > 0)
        std_inputs = standardised_inputs(arrays, views, norm, device, s2_stored)

        def view_input(source_index: int, sensors: Sequence[str]):
            parts = [std_inputs[s if source_index == 0 else f"{s}@{source_index}"] for s in sensors]
            return parts[0] if len(parts) == 1 else fn.cat(*parts, axis=2)

        if not views_in_graph:
            keys, _ = view_inputs(views)
            return (*(view_input(*key) for key in keys), ids, *params)
        results = []
        for v, view in enumerate(views.views):
            x = view_input(view.source, view.sensors)
            matrix, gain, offset, sigma = params[4 * v : 4 * v + 4]
            if device == "gpu":  # arithmetic operands live with the data; op arguments stay on the CPU
                gain, offset = gain.gpu(), offset.gpu()
            results.append(augment_view(x, matrix, gain, offset, sigma, view.size))
        return (*results, ids)

    return pipeline()
