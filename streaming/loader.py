"""``SSLLoader``: batches of augmented views for self-supervised training, from local disk or S3.

Flat list of what happens to a sample, and what holds after each stage:

  catalog.npz + split + sensor filter   -> rows: the epoch's sample set (dataset row ids)
  EpochPlan(seed, epoch, global batch)  -> a global order; rank r's positions of step k are fixed
  SampleSource (DALI worker process)    -> per batch: member bytes by byte range (ShardReader), HWC
                                           arrays (S2 with every stored band), per-view parameters
                                           drawn from (seed, epoch, position)
  DALI graph (GPU or CPU mode)          -> S2 bands selected, standardised, resampled, jittered, blurred
                                           views (HWC float32)
  SSLLoader.__iter__                    -> Batch(views=[N,C,H,W channels-last tensors], rows, positions)

Every rank yields ``len(loader)`` batches per epoch; the position (epoch, next step) is ``state_dict()``
and resuming from it continues with exactly the samples not yet delivered, on any world size that
divides the same global batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from eossl.ingest.catalog import Catalog
from eossl.ingest.integrity import read_catalog, read_manifest
from eossl.ingest.storage import DatasetRoot

from .plan import EpochPlan, LoaderPosition, PlanConfig, rows_digest
from .source import SampleSource
from .storage import ShardReader, StorageOptions
from .views import ViewConfig, ViewSet

__all__ = [
    "ON_CORRUPT",
    "Batch",
    "CorruptDataError",
    "LoaderConfig",
    "SSLLoader",
    "SampleSource",
    "StreamingError",
    "dist_info",
    "select_rows",
]

SPLITS = ("train", "test", "all")
ON_CORRUPT = ("fail", "skip")


class StreamingError(RuntimeError):
    """The loader could not deliver a batch (corrupt shard with on_corrupt='fail', storage unavailable...)."""


class CorruptDataError(StreamingError):
    """More samples were skipped as corrupt than ``LoaderConfig.max_corrupt_fraction`` allows: names the
    shards they came from."""


@dataclass(frozen=True)
class LoaderConfig:
    """Streaming loader settings.

    Attributes:
        batch_size: samples per rank per step; the global batch is batch_size x world size.
        split: 'train', 'test' or 'all' (scene-level split written by ingest).
        plan: shard/sample shuffling of each epoch.
        views: view mode, inputs and augmentation.
        storage: cache and retry settings for remote shards.
        device: 'gpu', 'cpu' or 'auto' (GPU when torch sees one).
        num_threads: DALI operator threads per rank.
        workers: reader processes per rank (DALI parallel external source). 0 reads in the main process.
        prefetch: batches DALI prepares ahead.
        on_corrupt: what a sample whose bytes fail a check does (truncated shard, a member whose CRC-32C
            differs from the catalog's after the retries of ``storage``): 'fail' stops with an error naming
            the shard, member and sample key; 'skip' (default) replaces it by the next readable sample of
            the epoch's order, counts it (``Batch.substituted``, ``SSLLoader.substituted``) and names its
            shard. Skip is the default because one damaged member in a multi-day run should cost one
            sample, not the run, while ``max_corrupt_fraction`` stops a run whose data is really broken.
        max_corrupt_fraction: with 'skip', stop (``CorruptDataError`` naming the shards) once this rank
            has skipped more than this fraction of its samples of one epoch (0.001: 45 of a 45k-sample
            share); counted since the loader was made.
        lookahead_steps: steps ahead whose shards are prefetched into the cache.
        max_samples: only the first N samples of the split, in catalog (shard) order: benchmarks and smoke
            runs on a full-size dataset read a few shards instead of all of them. None: every sample.
    """

    batch_size: int = 64
    split: str = "train"
    plan: PlanConfig = field(default_factory=PlanConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    device: str = "auto"
    num_threads: int = 2
    workers: int = 2
    prefetch: int = 2
    on_corrupt: str = "skip"
    max_corrupt_fraction: float = 0.001
    lookahead_steps: int = 4
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.device not in ("gpu", "cpu", "auto"):
            raise ValueError(f"device must be gpu, cpu or auto, got {self.device!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("batch_size must be >= 1 and workers >= 0")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")
        if not 0 <= self.max_corrupt_fraction <= 1:
            raise ValueError(f"max_corrupt_fraction must be in [0, 1], got {self.max_corrupt_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")


@dataclass
class Batch:
    """One rank's batch: the views, and which samples they came from."""

    views: list[torch.Tensor]  # each (B, C, H, W), channels-last memory format
    rows: torch.Tensor  # (B,) dataset row ids
    positions: torch.Tensor  # (B,) positions in the epoch's global order
    substituted: int  # samples replaced because their bytes were corrupt
    epoch: int
    step: int
    corrupt_shards: tuple[int, ...] = ()  # shard index of each replaced sample


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else RANK/WORLD_SIZE (set by launchers)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def select_rows(catalog: Catalog, split: str, sensors: tuple[str, ...]) -> np.ndarray:
    """Row ids of the samples an epoch covers: the split, and only samples that have every sensor read."""
    mask = np.ones(len(catalog), dtype=bool)
    if split != "all":
        mask &= catalog.train if split == "train" else ~catalog.train
    for sensor in sensors:
        mask &= catalog.has[sensor]
    return np.flatnonzero(mask)


class SSLLoader:
    """Iterates one epoch per ``for`` loop; see the module docstring."""

    def __init__(
        self,
        dataset: str,
        cfg: LoaderConfig,
        rank: int | None = None,
        world_size: int | None = None,
        position: LoaderPosition | None = None,
    ):
        self.dataset = dataset
        self.cfg = cfg
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        out = DatasetRoot(dataset)
        self.manifest = read_manifest(out)  # both checked against their recorded sha256
        self.catalog = read_catalog(out, self.manifest)
        self.views = ViewSet(cfg.views)
        self.rows = select_rows(self.catalog, cfg.split, self.views.sensors)[: cfg.max_samples]
        if len(self.rows) == 0:
            raise ValueError(f"{dataset}: no {cfg.split} samples with {'+'.join(self.views.sensors)}")
        self.global_batch = cfg.batch_size * self.world_size
        self.position = position or LoaderPosition()
        self.device = cfg.device if cfg.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
        self.device_id = int(os.environ.get("LOCAL_RANK", 0)) if self.device == "gpu" else None
        spec = self.views.input_spec
        mean, std = spec.normalisation(self.manifest)
        slices = spec.sensor_slices()
        self.norm = {s: (mean[sl], std[sl]) for s, sl in slices.items()}
        self._iterator = None
        self._built_at: LoaderPosition | None = None
        self.substituted = 0
        self.corrupt_shards: dict[str, int] = {}  # shard URL -> samples skipped from it
        self.checksums = self.catalog.crc32c is not None
        if not self.checksums:
            warnings.warn(
                f"{dataset}: the catalog records no member checksums (written by an older eossl): samples "
                "are read without checking their bytes; ingest the dataset again to check them",
                stacklevel=2,
            )

    # -- the epoch ---------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        e = self.position.epoch if epoch is None else epoch
        return EpochPlan(self.rows, self.catalog.shard[self.rows], self.cfg.plan, e, self.global_batch)

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return self.plan(0).steps

    @property
    def channels(self) -> list[int]:
        return [self.views.channels(v) for v in range(len(self.views.views))]

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self.position.to_dict(),
            "global_batch": self.global_batch,
            "seed": self.cfg.plan.seed,
            "rows_digest": rows_digest(self.rows),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"cannot resume: global batch was {state['global_batch']}, now {self.global_batch} "
                "(keep batch_size x world size constant to resume exactly)"
            )
        if state["rows_digest"] != rows_digest(self.rows) or state["seed"] != self.cfg.plan.seed:
            raise ValueError("cannot resume: the sample set or seed differs from the checkpoint's")
        self.position = LoaderPosition(state["epoch"], state["step"])
        self._close_iterator()

    # -- DALI --------------------------------------------------------------------------------------
    def sample_source(self) -> SampleSource:
        """The batch callable DALI runs (reader, plan, view draws), e.g. to time reading alone."""
        reader = ShardReader(self.dataset, self.manifest["shards"], self.cfg.storage)
        s1_fill = self.norm["s1"][0] if "s1" in self.norm else np.zeros(2, np.float32)
        return SampleSource(
            reader,
            self.catalog,
            self.rows,
            self.views,
            s1_fill,
            self.cfg.plan,
            self.cfg.batch_size,
            self.rank,
            self.world_size,
            self.position,
            self.cfg.on_corrupt,
            self.cfg.lookahead_steps,
            self.cfg.storage.requests_in_flight,
        )

    def _build(self):
        from .dali_pipeline import DALIGenericIterator, build_pipeline

        pipe = build_pipeline(
            self.sample_source(),
            self.views,
            self.norm,
            self.cfg.batch_size,
            self.device,
            self.device_id,
            self.cfg.num_threads,
            self.cfg.workers,
            self.cfg.prefetch,
            seed=self.cfg.plan.seed,
        )
        names = [f"view{v}" for v in range(len(self.views.views))] + ["ids"]
        self._iterator = DALIGenericIterator([pipe], names, auto_reset=False, prepare_first_batch=False)
        self._built_at = self.position

    def _count_corrupt(self, batch: Batch) -> None:
        """Count a batch's replaced samples per shard; stop above ``max_corrupt_fraction`` of an epoch."""
        self.substituted += batch.substituted
        for shard in batch.corrupt_shards:
            url = f"{self.dataset.rstrip('/')}/{self.manifest['shards'][shard]['path']}"
            self.corrupt_shards[url] = self.corrupt_shards.get(url, 0) + 1
        warnings.warn(
            f"epoch {batch.epoch} step {batch.step}: {batch.substituted} samples of corrupt or truncated "
            f"shards replaced by the next readable ones ({self.substituted} so far)",
            stacklevel=3,
        )
        per_epoch = len(self) * self.cfg.batch_size
        if self.substituted > self.cfg.max_corrupt_fraction * per_epoch:
            self._close_iterator()
            named = ", ".join(f"{url} ({n})" for url, n in sorted(self.corrupt_shards.items()))
            raise CorruptDataError(
                f"{self.substituted} samples skipped as corrupt, more than max_corrupt_fraction="
                f"{self.cfg.max_corrupt_fraction} of this rank's {per_epoch} samples per epoch; "
                f"samples skipped per shard: {named} (eossl verify names every damaged member)"
            )

    def _close_iterator(self) -> None:
        self._iterator = None
        self._built_at = None

    def __iter__(self):
        steps = self.plan().steps
        if self.position.step >= steps:
            self.position = LoaderPosition(self.position.epoch + 1, 0)
        if self._iterator is None or self._built_at is None:
            self._build()
        epoch = self.position.epoch
        try:
            while True:
                try:
                    out = next(self._iterator)[0]
                except StopIteration:
                    break
                except (
                    Exception
                ) as exc:  # DALI re-raises reader-process errors as a bare Exception + traceback
                    self._close_iterator()
                    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                    raise StreamingError(
                        f"streaming {self.dataset} failed at epoch {epoch} step "
                        f"{self.position.step}: {lines[-1] if lines else exc!r}"
                    ) from exc
                ids = out["ids"]
                batch = Batch(
                    views=[out[f"view{v}"].permute(0, 3, 1, 2) for v in range(len(self.views.views))],
                    rows=ids[:, 0].cpu(),
                    positions=ids[:, 1].cpu(),
                    substituted=int(ids[:, 3].sum()),
                    epoch=epoch,
                    step=self.position.step,
                    corrupt_shards=tuple(int(s) for s in ids[:, 4].tolist() if s >= 0),
                )
                if batch.substituted:
                    self._count_corrupt(batch)
                self.position = LoaderPosition(epoch, self.position.step + 1)
                yield batch
        except GeneratorExit:  # the consumer stopped mid-epoch: DALI has prefetched past our position
            self._close_iterator()
            raise
        self._iterator.reset()
        self.position = LoaderPosition(epoch + 1, 0)
