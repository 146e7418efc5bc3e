"""Loader benchmark: samples/s of the streaming loader against per-patch GeoTIFF reads in a torch DataLoader.

What is compared, in one run, on the same patches, from a warm page cache, with the same number of CPU
workers and the same batch size on both sides (``bench_loader``):

- **read** (read + decode + standardise, no augmentation). *Ours*: the loader's real reading path, i.e.
  ``SampleSource`` (one ``pread`` per sample from the shards, ``.npy`` view, S2 band selection, S1 NaN
  fill, epoch plan, view-parameter draw) in DALI's parallel external source workers, then the loader's own
  ``standardise`` (S1 clip, per-channel mean/std) and the S1+S2 concatenation in a DALI CPU graph: one
  (B, 12, 256, 256) float32 batch. *Baseline*: a map-style torch ``Dataset`` that opens the sample's S1
  and S2 GeoTIFFs with rasterio (reading only the selected S2 bands, as float32), fills S1 NaNs,
  clips and standardises with torch ops on whole tensors, in ``DataLoader(num_workers=W, shuffle=True)``.
  Both produce the same values (tests/test_streaming_bench.py checks it to 1e-4).
- **augment**: the default MoCo-style two-view augmentation at 224 px of S1+S2 (``SSLLoader``, DALI
  CPU mode) against the same baseline reads followed, per view, by the *same* parameters
  (``ViewSet.draw``) applied with torch: ``affine_grid``/``grid_sample`` (bilinear), per-band
  gain/offset, ``torchvision`` Gaussian blur with DALI's window (skipped when the view draws no blur).
  Given the same position, the two sides' views agree to ~3e-3 in standardised units (tested).
- **from S3** (``s3_source``/``s3_dataset``, or ``local_s3``): both stages again with both sides reading
  from the object store: the baseline opens ``s3://`` GeoTIFFs with rasterio (GDAL ``/vsis3/``); ours reads
  the shards through a node-local shard cache (filled by the warm-up epoch) and, separately, without one
  (one ranged GET per sample).

Timing: both sides of a stage are alive together; after one warm-up epoch each, ``repeat`` rounds of
interleaved runs (ours, baseline, then baseline, ours, ...) so that a shared machine's changing load hits
both alike. Each run waits until the other side's background work has stopped (DALI prefetches the next
epoch as soon as one ends), delivers one untimed lead-in epoch (so it starts in steady state), then whole
epochs, at least two and at least ``samples`` samples. Reported: the median samples/s of each side, the
median of the per-round ratios (the speedups), and CPU-milliseconds per sample of our process tree (the
bench process and its workers, from /proc), whose ratio is the ``cpu_efficiency``: it moves much less with
other load, unlike wall-clock rates. Baseline workers run torch with one thread (``worker_init_fn``), as
a tuned DataLoader would on a small machine; ours uses the loader's own settings (``workers`` reader
processes, ``workers`` DALI threads).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.errors
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from eossl.ingest.bands import PATCH_SIZE
from eossl.ingest.bench import machine_info
from eossl.ingest.format import CATALOG, MANIFEST
from eossl.ingest.layout import scan_source
from eossl.ingest.storage import Output

from .augment import NO_BLUR_SIGMA, AugmentConfig, ViewParams
from .inputs import InputSpec
from .loader import LoaderConfig, SSLLoader
from .plan import PlanConfig
from .storage import StorageOptions
from .views import ViewConfig, ViewSet

__all__ = ["GeoTiffPatches", "bench_loader", "gdal_s3_options", "geotiff_files", "loader_configs", "read_batches", "torch_view"]

GOALS = {"read": 20.0, "augment": 5.0}
SENSORS = ("s1", "s2")


# -- the baseline: per-patch GeoTIFFs, torch ops, DataLoader ------------------------------------------
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

    def __init__(self, files: list[tuple[str, str]], spec: InputSpec, mean: np.ndarray, std: np.ndarray,
                 views: ViewSet | None = None, seed: int = 0, gdal_options: dict[str, str] | None = None):
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
    options = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_TIMEOUT": str(math.ceil(timeout_s)),
               "GDAL_HTTP_CONNECTTIMEOUT": str(math.ceil(timeout_s)), "GDAL_HTTP_MAX_RETRY": str(retries),
               "GDAL_HTTP_RETRY_DELAY": "0.5"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint)
        options.update(AWS_S3_ENDPOINT=url.netloc + url.path.rstrip("/"),
                       AWS_HTTPS="YES" if url.scheme == "https" else "NO", AWS_VIRTUAL_HOSTING="FALSE")
    return options


def geotiff_files(source: str, keys: np.ndarray) -> list[tuple[str, str]]:
    """(s1, s2) GeoTIFF paths of each catalog key, found in the SEN12MS tree ``source``."""
    found = {g.key: g.files for g in scan_source(source).groups}
    out = []
    for key in keys.tolist():
        files = found.get(key, {})
        if "s1" not in files or "s2" not in files:
            raise ValueError(f"{source}: no s1/s2 GeoTIFFs for dataset sample {key!r} (is this the ingest source?)")
        out.append((files["s1"][0], files["s2"][0]))
    return out


# -- ours: the loader's reading path without augmentation -----------------------------------------------
def read_batches(loader: SSLLoader, prefetch: int = 2) -> Iterator[Callable[[], Iterator[dict]]]:
    """Yield callables that each run one epoch of the loader's reading path (see module docstring).

    Each epoch yields dicts with ``x`` (B, C, 256, 256) standardised float32 (channels-last strides)
    and ``rows``. The DALI pipeline and its reader workers live as long as the generator.
    """
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from .dali_pipeline import standardise

    cfg = loader.cfg
    source = loader.sample_source()  # the loader's own SampleSource, reader and plan
    sensors = loader.views.sensors
    n_outputs = len(sensors) + 1 + 4 * len(loader.views.views)
    clip = loader.views.input_spec.s1_clip

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=None,
                  py_num_workers=max(cfg.workers, 1), py_start_method="spawn", prefetch_queue_depth=prefetch,
                  seed=cfg.plan.seed, exec_dynamic=True)
    def pipeline():
        outs = fn.external_source(source=source, num_outputs=n_outputs, batch=False, parallel=cfg.workers > 0,
                                  layout=["HWC"] * len(sensors) + [""] * (n_outputs - len(sensors)))
        parts = [standardise(arr, *loader.norm[s], clip if s == "s1" else None)
                 for s, arr in zip(sensors, outs[: len(sensors)], strict=True)]
        return fn.cat(*parts, axis=2) if len(parts) > 1 else parts[0], outs[len(sensors)]

    with warnings.catch_warnings():  # the view parameters are drawn (a real cost of the source) but unused
        warnings.filterwarnings("ignore", message="The external source node")
        iterator = DALIGenericIterator([pipeline()], ["x", "ids"], auto_reset=False, prepare_first_batch=False)

    def epoch() -> Iterator[dict]:
        while True:
            try:
                out = next(iterator)[0]
            except StopIteration:
                break
            yield {"x": out["x"].permute(0, 3, 1, 2), "rows": out["ids"][:, 0]}
        iterator.reset()

    while True:
        yield epoch


# -- timing -------------------------------------------------------------------------------------------
Epochs = Callable[[], int]  # delivers one whole epoch, returns its sample count


def _tree_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live descendants; None off Linux."""
    if not os.path.isdir("/proc"):
        return None
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state): ppid, ..., utime, stime
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = int(fields[11]) + int(fields[12])
    tree, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def _wait_idle(timeout_s: float = 10.0, interval_s: float = 0.2) -> None:
    """Wait until our processes use < 10 % of a core (a finished side's prefetch must not overlap the next)."""
    last, deadline = _tree_cpu_s(), time.monotonic() + timeout_s
    while last is not None and time.monotonic() < deadline:
        time.sleep(interval_s)
        now = _tree_cpu_s()
        if now - last < 0.1 * interval_s:
            return
        last = now


def _timed_run(epochs: Epochs, min_samples: int, min_epochs: int = 2) -> dict:
    """One run: a lead-in epoch (untimed, so the run starts in steady state), then timed whole epochs."""
    epochs()
    cpu0, t0 = _tree_cpu_s(), time.perf_counter()
    n = count = 0
    while n < min_samples or count < min_epochs:
        n += epochs()
        count += 1
    seconds, cpu1 = time.perf_counter() - t0, _tree_cpu_s()
    return {"samples_per_s": n / seconds, "cpu_ms_per_sample": None if cpu0 is None else 1000 * (cpu1 - cpu0) / n,
            "samples": n, "epochs": count}


def _summary(runs: list[dict]) -> dict:
    cpu = [r["cpu_ms_per_sample"] for r in runs]
    return {"samples_per_s": round(float(np.median([r["samples_per_s"] for r in runs])), 1),
            "cpu_ms_per_sample": None if None in cpu else round(float(np.median(cpu)), 2),
            "runs_samples_per_s": [round(r["samples_per_s"], 1) for r in runs],
            "samples_per_run": runs[-1]["samples"], "epochs_per_run": runs[-1]["epochs"]}


def _compare(ours: Epochs, baseline: Epochs, min_samples: int, repeat: int) -> dict:
    """Interleaved runs (ours, baseline, baseline, ours, ...) so that both sides see the same machine load.

    Both sides are alive throughout; before each run the other side's background work (DALI prefetches
    the next epoch as soon as one ends) is waited out. The speedup is the median of per-round ratios.
    """
    sides = {"ours": ours, "geotiff_dataloader": baseline}
    for epochs in sides.values():
        epochs()  # warm-up: worker start-up, first reads
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeat):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            _wait_idle()
            runs[name].append(_timed_run(sides[name], min_samples))
    ratios = [o["samples_per_s"] / b["samples_per_s"] for o, b in zip(runs["ours"], runs["geotiff_dataloader"],
                                                                      strict=True)]
    out = {name: _summary(rs) for name, rs in runs.items()}
    cpu_o, cpu_b = out["ours"]["cpu_ms_per_sample"], out["geotiff_dataloader"]["cpu_ms_per_sample"]
    return {**out, "speedup": round(float(np.median(ratios)), 2), "runs_speedup": [round(x, 2) for x in ratios],
            "cpu_efficiency": None if cpu_o is None else round(cpu_b / cpu_o, 2)}


def _single(epochs: Epochs, min_samples: int, repeat: int) -> dict:
    epochs()
    return _summary([_timed_run(epochs, min_samples) for _ in range(repeat)])


@contextmanager
def _dataloader_epochs(dataset: GeoTiffPatches, workers: int, batch_size: int) -> Iterator[Epochs]:
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     worker_init_fn=_one_thread if workers else None, persistent_workers=workers > 0,
                                     multiprocessing_context="spawn" if workers else None)  # no fork of DALI threads
    yield lambda: sum(len(b) if isinstance(b, torch.Tensor) else len(b[0]) for b in dl)


@contextmanager
def _loader_epochs(dataset: str, cfg: LoaderConfig) -> Iterator[Epochs]:
    loader = SSLLoader(dataset, cfg, rank=0, world_size=1)

    def run_epoch() -> int:
        n = sum(len(batch.rows) for batch in loader)
        if cfg.device == "gpu":
            torch.cuda.synchronize()
        return n

    yield run_epoch


@contextmanager
def _read_path_epochs(dataset: str, cfg: LoaderConfig) -> Iterator[Epochs]:
    epochs = read_batches(SSLLoader(dataset, cfg, rank=0, world_size=1), cfg.prefetch)
    try:
        yield lambda: sum(len(b["rows"]) for b in next(epochs)())
    finally:
        epochs.close()


def _warm_page_cache(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(16 * 2**20):
                total += len(chunk)
    return total


def _generate(tmp: Path, patches: int) -> tuple[str, str]:
    from eossl.ingest.config import IngestConfig, SplitOptions
    from eossl.ingest.sample_data import write_sample_data
    from eossl.ingest.writer import run_ingest

    source, dataset = tmp / "src", tmp / "ds"
    write_sample_data(source, patches, seed=0)
    run_ingest(IngestConfig(source=str(source), dataset=str(dataset), formats=("wds",), progress=False,
                            shard_bytes=32 * 2**20, split=SplitOptions(budgets=())))
    return str(source), str(dataset)


def loader_configs(workers: int, batch_size: int, seed: int = 0, max_samples: int | None = None
                   ) -> dict[str, LoaderConfig]:
    """The two loader settings compared: identity 256 px views (read path) and default MoCo views."""
    spec = InputSpec(sensors=SENSORS)
    base = LoaderConfig(batch_size=batch_size, split="all", device="cpu", workers=workers, num_threads=max(workers, 1),
                        plan=PlanConfig(seed=seed), max_samples=max_samples)
    return {
        "read": replace(base, views=ViewConfig(mode="single", inputs=spec, size=PATCH_SIZE, augment=AugmentConfig.none())),
        "augment": replace(base, views=ViewConfig(mode="single", inputs=spec, size=224)),
    }


S3_BUCKET = "eossl-bench"


@dataclass(frozen=True)
class _Setup:
    """What every comparison of one bench run shares: loader settings, the dataset's rows and statistics."""

    cfgs: dict[str, LoaderConfig]
    probe: SSLLoader
    norm: tuple[np.ndarray, np.ndarray]
    samples: int
    repeat: int

    def compare(self, ours: Epochs, files: list[tuple[str, str]], stage: str, gdal_options: dict | None = None) -> dict:
        """``ours`` against the GeoTIFF baseline over ``files`` with the same workers, batch and views."""
        cfg = self.cfgs[stage]
        views = self.probe.views if stage == "augment" else None
        baseline = GeoTiffPatches(files, self.probe.views.input_spec, *self.norm, views=views, seed=cfg.plan.seed,
                                  gdal_options=gdal_options)
        with _dataloader_epochs(baseline, cfg.workers, cfg.batch_size) as theirs:
            return _compare(ours, theirs, self.samples, self.repeat)


def _shard_paths(dataset: str, probe: SSLLoader) -> list[Path]:
    """The shard files that hold the benched samples."""
    shards = probe.manifest["shards"]
    return [Path(Output(dataset).path(shards[i]["path"])) for i in sorted(set(probe.catalog.shard[probe.rows].tolist()))]


def _bench_s3(s3_source: str | None, s3_dataset: str | None, setup: _Setup) -> dict:
    """Both sides from the object store: GeoTIFFs through GDAL vs our shards with and without a node cache."""
    keys = dict.fromkeys(("s3_read_speedup_vs_geotiff", "s3_speedup_vs_geotiff", "s3_nocache_read_speedup_vs_geotiff",
                          "s3_nocache_speedup_vs_geotiff", "s3_read_samples_per_s", "s3_samples_per_s"))
    if s3_dataset is None:
        return keys
    files = geotiff_files(s3_source, setup.probe.catalog.key[setup.probe.rows])
    gdal = gdal_s3_options()
    report: dict = {
        "source": s3_source, "dataset": s3_dataset, "endpoint_from_env": bool(os.environ.get("AWS_ENDPOINT_URL")),
        "baseline": "rasterio.open('s3://...') per GeoTIFF (GDAL /vsis3/, GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR)",
        "cache": "node-local shard cache in a temporary folder (empty at the start: filled by the warm-up epoch)",
        "no_cache": "one ranged GET per sample (its S1 and S2 members lie together in the shard)",
    }
    cache_dir = Path(tempfile.mkdtemp(prefix="eossl-bench-cache-"))
    try:
        for stage, epochs in (("read", _read_path_epochs), ("augment", _loader_epochs)):
            report[stage] = {}
            for variant, storage in (("cache", StorageOptions(cache_dir=str(cache_dir))), ("no_cache", StorageOptions())):
                with epochs(s3_dataset, replace(setup.cfgs[stage], storage=storage)) as ours:
                    report[stage][variant] = setup.compare(ours, files, stage, gdal)
                del ours
                gc.collect()  # end both sides' workers before the next comparison
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"s3": report,
            "s3_read_speedup_vs_geotiff": report["read"]["cache"]["speedup"],
            "s3_speedup_vs_geotiff": report["augment"]["cache"]["speedup"],
            "s3_nocache_read_speedup_vs_geotiff": report["read"]["no_cache"]["speedup"],
            "s3_nocache_speedup_vs_geotiff": report["augment"]["no_cache"]["speedup"],
            "s3_read_samples_per_s": report["read"]["cache"]["ours"]["samples_per_s"],
            "s3_samples_per_s": report["augment"]["cache"]["ours"]["samples_per_s"]}


def _bench_local_s3(source: str, dataset: str, files: list[tuple[str, str]], setup: _Setup) -> dict:
    """``_bench_s3`` against a ``moto_server`` started here (a child: its CPU counts on both sides).

    Only what the bench reads is uploaded (the benched samples' GeoTIFFs; the manifest, catalog and their
    shards), so a full-size dataset costs no more than its benched part. The server's log folder is
    removed afterwards unless the run failed (the error names the log).
    """
    from .local_s3 import aws_environment, moto_s3_server, upload_files

    logs = Path(tempfile.mkdtemp(prefix="eossl-bench-s3-"))
    with moto_s3_server(logs) as endpoint, aws_environment(endpoint):
        upload_files(source, [f for pair in files for f in pair], f"s3://{S3_BUCKET}/source")
        upload_files(dataset, [Path(dataset) / MANIFEST, Path(dataset) / CATALOG, *_shard_paths(dataset, setup.probe)],
                     f"s3://{S3_BUCKET}/dataset")
        out = _bench_s3(f"s3://{S3_BUCKET}/source", f"s3://{S3_BUCKET}/dataset", setup)
    shutil.rmtree(logs, ignore_errors=True)
    out["s3"]["server"] = "moto_server on 127.0.0.1 (started by the bench; objects in memory)"
    return out


def bench_loader(
    source: str | None = None,
    dataset: str | None = None,
    workers: int = 2,
    batch_size: int = 32,
    samples: int = 512,
    repeat: int = 3,
    patches: int = 64,
    max_samples: int | None = 256,
    s3_source: str | None = None,
    s3_dataset: str | None = None,
    local_s3: bool = False,
    seed: int = 0,
) -> dict:
    """Samples/s of the streaming loader against GeoTIFFs + torch ``DataLoader``, read and augment.

    Args:
        source: the SEN12MS GeoTIFF tree ``dataset`` was ingested from (the baseline reads the same patches).
        dataset: an ingested eossl dataset (local folder). Both None: ``patches`` synthetic patches are
            generated and ingested into a temporary folder.
        workers: CPU worker processes on both sides (DataLoader workers; DALI reader workers and threads).
        batch_size: samples per batch on both sides.
        samples: samples per timed run (whole epochs, at least two).
        repeat: timed runs per measurement; the median is reported.
        patches: patches generated when no dataset is given.
        max_samples: bench the first N samples of the dataset (catalog order, so a few shards), None for
            all: an epoch of a full-size dataset would take hours, and every timed run is whole epochs.
        s3_source, s3_dataset: the same GeoTIFF tree and dataset on S3 (``s3://...``; endpoint and
            credentials from the standard AWS environment, e.g. ``AWS_ENDPOINT_URL``): both sides are also
            timed reading from the object store (the baseline through GDAL's ``/vsis3/``; ours with a
            node-local shard cache and without one).
        local_s3: start a local S3-compatible server (``moto_server``, test extra) on 127.0.0.1, upload
            ``source`` and ``dataset`` to it and time the S3 comparison there; stopped at the end.
        seed: plan and augmentation seed.

    Returns:
        A JSON-ready dict: machine, settings, per-side samples/s of ``read`` and ``augment``, the speedups
        ``read_speedup_vs_geotiff`` and ``speedup_vs_geotiff``; with S3 the same from the object store
        (``s3_read_speedup_vs_geotiff``, ``s3_speedup_vs_geotiff`` with the shard cache,
        ``s3_nocache_*`` without it, and ours in ``s3_read_samples_per_s`` / ``s3_samples_per_s``);
        ``gpu_samples_per_s`` (None when not measured).
    """
    if (source is None) != (dataset is None):
        raise ValueError("give both source (the GeoTIFF tree) and dataset (its ingest), or neither")
    if dataset is not None and "://" in dataset:
        raise ValueError(f"dataset must be a local folder (pass s3_dataset for S3), got {dataset!r}")
    if (s3_source is None) != (s3_dataset is None):
        raise ValueError("give both s3_source (the GeoTIFF tree on S3) and s3_dataset (its ingest on S3), or neither")
    if local_s3 and s3_dataset is not None:
        raise ValueError("local_s3 uploads source and dataset to a local server: do not also give s3_source/s3_dataset")
    if workers < 0 or batch_size < 1 or samples < 1 or repeat < 1 or (max_samples is not None and max_samples < 1):
        raise ValueError("need workers >= 0, batch_size >= 1, samples >= 1, repeat >= 1, max_samples >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="eossl-bench-loader-")) if source is None else None
    try:
        if tmp is not None:
            source, dataset = _generate(tmp, patches)
        cfgs = loader_configs(workers, batch_size, seed, max_samples)
        probe = SSLLoader(dataset, cfgs["augment"], rank=0, world_size=1)
        files = geotiff_files(source, probe.catalog.key[probe.rows])
        spec = probe.views.input_spec
        mean, std = spec.normalisation(probe.manifest)
        tif_bytes = _warm_page_cache([Path(f) for pair in files for f in pair])
        _warm_page_cache(_shard_paths(dataset, probe))
        os.sync()  # no writeback of freshly generated files during the timed runs
        member_bytes = sum(int(probe.catalog.size[s][probe.rows].sum()) for s in SENSORS)
        result: dict = {
            "machine": {**machine_info(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
            "source": "generated" if tmp else source,
            "dataset": "generated" if tmp else dataset,
            "samples_in_dataset": len(files),
            "settings": {
                "workers": workers, "batch_size": batch_size, "samples_per_run": samples, "repeat": repeat,
                "max_samples": max_samples,
                "statistic": "median", "seed": seed, "split": "all", "device": "cpu (DALI CPU mode)",
                "inputs": spec.channel_names,
                "read": "read + decode + S1 NaN fill/clip + standardise + stack -> (B, 12, 256, 256) float32",
                "augment": "ViewConfig(mode='single', s1+s2 land bands, size=224), default AugmentConfig: 2 views",
                "ours": f"DALI parallel external source (SampleSource, {workers} workers) + DALI CPU graph "
                        f"({max(workers, 1)} threads)",
                "baseline": f"rasterio per GeoTIFF + torch ops in DataLoader(num_workers={workers}, "
                            f"batch_size={batch_size}, shuffle=True, persistent_workers=True), 1 torch thread/worker",
                "page_cache": "warm (every GeoTIFF and shard read once before timing)",
            },
            "bytes_per_sample": {"geotiff_s1_s2": tif_bytes // len(files), "shard_members_s1_s2": member_bytes // len(files)},
        }
        setup = _Setup(cfgs, probe, (mean, std), samples, repeat)
        for stage, epochs in (("read", _read_path_epochs), ("augment", _loader_epochs)):
            with epochs(dataset, cfgs[stage]) as ours:
                result[stage] = setup.compare(ours, files, stage)
            del ours
            gc.collect()  # end both sides' workers before the next comparison
        result["read_speedup_vs_geotiff"] = result["read"]["speedup"]
        result["speedup_vs_geotiff"] = result["augment"]["speedup"]
        result["read_cpu_efficiency_vs_geotiff"] = result["read"]["cpu_efficiency"]
        result["cpu_efficiency_vs_geotiff"] = result["augment"]["cpu_efficiency"]
        result["goals"] = {"read_speedup_vs_geotiff": GOALS["read"], "speedup_vs_geotiff": GOALS["augment"]}

        if local_s3:
            result.update(_bench_local_s3(source, dataset, files, setup))
        else:
            result.update(_bench_s3(s3_source, s3_dataset, setup))

        result["gpu_samples_per_s"] = None
        if torch.cuda.is_available():
            with _loader_epochs(dataset, replace(cfgs["augment"], device="gpu")) as ours:
                gpu = _single(ours, samples, repeat)
            del ours
            gc.collect()
            result["gpu"] = {"device": torch.cuda.get_device_name(0), "augment": gpu}
            result["gpu_samples_per_s"] = gpu["samples_per_s"]
        result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
