"""The two sides of ``eossl bench loader`` and what every comparison of one bench run shares.

*Ours* is the loader itself: ``read_path_epochs`` runs its real reading path without augmentation (the
loader's own ``SampleSource`` in its reader processes (``shared_readers``), then its ``standardise`` and the
S1+S2 concatenation in a DALI CPU graph), ``loader_epochs`` the whole ``SSLLoader`` with its views.
*Theirs* is ``geotiff_baseline``. ``Setup.compare`` times one against the other with the same workers,
batch size and views.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from eossl.ingest.bands import PATCH_SIZE
from eossl.ingest.storage import DatasetRoot
from eossl.streaming.augment import AugmentConfig
from eossl.streaming.inputs import InputSpec, stored_s2_bands
from eossl.streaming.loader import LoaderConfig, SSLLoader
from eossl.streaming.plan import PlanConfig
from eossl.streaming.views import ViewConfig

from .geotiff_baseline import GeoTiffPatches, dataloader_epochs
from .harness import Epochs, compare

__all__ = [
    "SENSORS",
    "Setup",
    "loader_configs",
    "loader_epochs",
    "read_batches",
    "read_path_epochs",
    "shard_paths",
]

SENSORS = ("s1", "s2")


# -- ours: the loader's reading path without augmentation -----------------------------------------------
def cpu_reader_pipeline(loader: SSLLoader, graph: Callable, prefetch: int, source=None):
    """A DALI CPU-mode pipeline: the loader's own batch source (``SSLLoader.batch_source``: its reader
    processes; or ``source``, a batch callable with the same outputs, in DALI's parallel workers), its
    outputs ``(arrays, ids, view params)`` passed through ``graph``."""
    from nvidia.dali import pipeline_def

    from eossl.streaming.dali_pipeline import external_batches

    cfg = loader.cfg
    source = loader.batch_source() if source is None else source

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=None,
        py_num_workers=max(cfg.workers, 1),
        py_start_method="spawn",
        prefetch_queue_depth=prefetch,
        seed=cfg.plan.seed,
        exec_dynamic=True,
    )
    def pipeline():
        return graph(*external_batches(source, loader.views, parallel=cfg.workers > 0))

    return pipeline()


def read_batches(loader: SSLLoader, prefetch: int = 2) -> Iterator[Callable[[], Iterator[dict]]]:
    """Yield callables that each run one epoch of the loader's reading path (see module docstring).

    Each epoch yields dicts with ``x`` (B, C, 256, 256) standardised float32 (channels-last strides)
    and ``rows``. The DALI pipeline and its reader workers live as long as the generator.
    """
    from nvidia.dali import fn
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from eossl.streaming.dali_pipeline import standardised_inputs

    def graph(arrays, ids, _params):
        parts = list(
            standardised_inputs(
                arrays, loader.views, loader.norm, "cpu", stored_s2_bands(loader.manifest)
            ).values()
        )
        return fn.cat(*parts, axis=2) if len(parts) > 1 else parts[0], ids

    with warnings.catch_warnings():  # the view parameters are drawn (a real cost of the source) but unused
        warnings.filterwarnings("ignore", message="The external source node")
        iterator = DALIGenericIterator(
            [cpu_reader_pipeline(loader, graph, prefetch)],
            ["x", "ids"],
            auto_reset=False,
            prepare_first_batch=False,
        )

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


@contextmanager
def loader_epochs(dataset: str, cfg: LoaderConfig) -> Iterator[Epochs]:
    loader = SSLLoader(dataset, cfg, rank=0, world_size=1)

    def run_epoch() -> int:
        n = sum(len(batch.rows) for batch in loader)
        if cfg.device == "gpu":
            torch.cuda.synchronize()
        return n

    yield run_epoch


@contextmanager
def read_path_epochs(dataset: str, cfg: LoaderConfig) -> Iterator[Epochs]:
    epochs = read_batches(SSLLoader(dataset, cfg, rank=0, world_size=1), cfg.prefetch)
    try:
        yield lambda: sum(len(b["rows"]) for b in next(epochs)())
    finally:
        epochs.close()


def loader_configs(
    workers: int, batch_size: int, seed: int = 0, max_samples: int | None = None
) -> dict[str, LoaderConfig]:
    """The two loader settings compared: identity 256 px views (read path) and default MoCo views."""
    spec = InputSpec(sensors=SENSORS)
    base = LoaderConfig(
        batch_size=batch_size,
        split="all",
        device="cpu",
        workers=workers,
        num_threads=max(workers, 1),
        plan=PlanConfig(seed=seed),
        max_samples=max_samples,
    )
    return {
        "read": replace(
            base, views=ViewConfig(mode="single", inputs=spec, size=PATCH_SIZE, augment=AugmentConfig.none())
        ),
        "augment": replace(base, views=ViewConfig(mode="single", inputs=spec, size=224)),
    }


@dataclass(frozen=True)
class Setup:
    """What every comparison of one bench run shares: loader settings, the dataset's rows and statistics."""

    cfgs: dict[str, LoaderConfig]
    probe: SSLLoader
    norm: tuple[np.ndarray, np.ndarray]
    samples: int
    repeat: int

    def compare(
        self, ours: Epochs, files: list[tuple[str, str]], stage: str, gdal_options: dict | None = None
    ) -> dict:
        """``ours`` against the GeoTIFF baseline over ``files`` with the same workers, batch and views."""
        cfg = self.cfgs[stage]
        views = self.probe.views if stage == "augment" else None
        baseline = GeoTiffPatches(
            files,
            self.probe.views.input_spec,
            *self.norm,
            views=views,
            seed=cfg.plan.seed,
            gdal_options=gdal_options,
        )
        with dataloader_epochs(baseline, cfg.workers, cfg.batch_size) as theirs:
            return compare(ours, theirs, self.samples, self.repeat)


def shard_paths(dataset: str, probe: SSLLoader) -> list[Path]:
    """The shard files that hold the benched samples."""
    shards = probe.manifest["shards"]
    return [
        Path(DatasetRoot(dataset).path(shards[i]["path"]))
        for i in sorted(set(probe.catalog.shard[probe.rows].tolist()))
    ]
