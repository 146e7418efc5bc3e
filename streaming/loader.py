"""``SSLLoader``: batches of augmented views for self-supervised training, from local disk or S3.

Flat list of what happens to a sample, and what holds after each stage:

  catalog.npz + split + sensor filter   -> rows: the epoch's sample set (dataset row ids)
  EpochPlan(seed, epoch, global batch)  -> a global order; rank r's positions of step k are fixed
  SampleSource (reader process)         -> per batch: member bytes by byte range (ShardReader) read
                                           into shared memory the graph reads in place
                                           (shared_readers), HWC arrays (S2 with every stored band),
                                           per-view parameters drawn from (seed, epoch, position)
  DALI graph (GPU or CPU mode)          -> S2 bands selected, standardised, resampled, jittered, blurred
                                           views (HWC float32); in CPU mode the graph stops after
                                           standardising and torch_augment makes the views (cpu_augment)
  SSLLoader.__iter__                    -> Batch(views=[N,C,H,W tensors], rows, positions)

Every rank yields ``len(loader)`` batches per epoch; the position (epoch, next step) is ``state_dict()``
and resuming from it continues with exactly the samples not yet delivered, on any world size that
divides the same global batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from eossl.ingest.catalog import Catalog
from eossl.ingest.integrity import read_manifest
from eossl.ingest.storage import DatasetRoot

from .inputs import dataset_patch_size, stored_s2_bands
from .node_catalog import node_catalog
from .plan import EpochPlan, LoaderPosition, PlanConfig, rows_digest
from .source import SampleSource
from .storage import ShardReader, StorageOptions
from .temporal import TEMPORAL_SOURCES, SeasonPartners
from .views import DRAW_RULE, ViewConfig, ViewSet
from .worker_watch import WorkerGone, WorkerWatch, dead_processes

if TYPE_CHECKING:  # torch is imported where a loader is built: LoaderConfig alone (a config) needs none
    import torch

__all__ = [
    "CPU_AUGMENT",
    "ON_CORRUPT",
    "READERS",
    "Batch",
    "CorruptDataError",
    "LoaderConfig",
    "SSLLoader",
    "SampleSource",
    "StreamingError",
    "dist_info",
    "node_count",
    "select_rows",
]

SPLITS = ("train", "test", "all")
ON_CORRUPT = ("fail", "skip")
CPU_AUGMENT = ("torch", "dali")
READERS = ("shared_memory", "dali")


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
        cpu_augment: in CPU mode, which kernels make the views from DALI's standardised batches: 'torch'
            (default: ``torch_augment``, ~3x cheaper per view than DALI's CPU operators) or 'dali' (the
            GPU's graph run on the CPU, to check what a GPU run computes). The same views either way, to
            float rounding. A GPU always makes them in DALI's graph.
        num_threads: DALI operator threads per rank.
        workers: reader processes per rank. 0 reads in the main process.
        readers: how the reader processes hand batches to DALI: 'shared_memory' (default:
            ``shared_readers``, each sample read straight into shared memory the graph reads in place) or
            'dali' (DALI's parallel external source, which copies every batch between processes: ~1.35x
            the CPU of the reading itself on top of it, docs/BENCHMARKS.md).
        reader_timeout_s: the longest wait for one batch from the reader processes (a stuck reader, e.g.
            on storage that stopped answering, fails the run instead of hanging it; a dead one is
            noticed within a second). Far above a batch's reading time, retries included.
        prefetch: batches DALI prepares ahead.
        on_corrupt: what a sample whose bytes fail a check does (truncated shard, a member whose CRC-32C
            differs from the catalog's after the retries of ``storage``): 'fail' stops with an error naming
            the shard, member and sample key; 'skip' (default) replaces it by the next readable sample of
            the epoch's order, counts it (``Batch.substituted``, ``SSLLoader.substituted``) and names its
            shard. Skip is the default because one damaged member in a multi-day run should cost one
            sample, not the run, while ``max_corrupt_fraction`` stops a run whose data is really broken.
        max_corrupt_fraction: with 'skip', stop (``CorruptDataError`` naming the shards) once this rank
            has skipped more than this fraction of its samples in one epoch (0.001: 45 of a 45k-sample
            share). Counted per epoch, so that one damaged member costs one sample per epoch for the
            whole run instead of adding up to a stop; the counts are in the checkpoint
            (``corrupt_state``), so a resumed epoch goes on counting where it stopped.
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
    cpu_augment: str = "torch"
    num_threads: int = 2
    workers: int = 2
    readers: str = "shared_memory"
    reader_timeout_s: float = 600.0
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
        if self.cpu_augment not in CPU_AUGMENT:
            raise ValueError(f"cpu_augment must be one of {CPU_AUGMENT}, got {self.cpu_augment!r}")
        if self.readers not in READERS:
            raise ValueError(f"readers must be one of {READERS}, got {self.readers!r}")
        if self.reader_timeout_s <= 0:
            raise ValueError(f"reader_timeout_s must be > 0, got {self.reader_timeout_s}")
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

    # each (B, C, H, W): channels-last memory format from DALI's graph (HWC), contiguous from torch's kernels
    views: list[torch.Tensor]
    rows: torch.Tensor  # (B,) dataset row ids
    positions: torch.Tensor  # (B,) positions in the epoch's global order
    substituted: int  # samples replaced because their bytes were corrupt
    epoch: int
    step: int
    corrupt_shards: tuple[int, ...] = ()  # shard index of each replaced sample


def node_count(world_size: int) -> int:
    """Nodes of the job: ``WORLD_SIZE / LOCAL_WORLD_SIZE`` as torchrun and accelerate set them (1 alone).

    Ranks are numbered node by node (rank = node * ranks_per_node + local rank), as those launchers do.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    if local < 1 or world_size % local:
        raise ValueError(f"LOCAL_WORLD_SIZE={local} does not divide the world size {world_size}")
    return world_size // local


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else RANK/WORLD_SIZE (set by launchers)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _auto_device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


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
        if cfg.plan.node_affinity:  # the plan shares the shards out over the launcher's nodes
            cfg = replace(cfg, plan=replace(cfg.plan, nodes=node_count(self.world_size)))
            self.cfg = cfg
        out = DatasetRoot(dataset)
        self.manifest = read_manifest(out)  # both checked against their recorded sha256
        # read once per node, mapped by every process (and pickled into reader processes as file names)
        self.catalog = node_catalog(out, self.manifest, cfg.storage.cache_dir, cfg.storage.lock_timeout_s)
        self.views = ViewSet(cfg.views, dataset_patch_size(self.manifest))
        self.rows = select_rows(self.catalog, cfg.split, self.views.sensors)[: cfg.max_samples]
        if len(self.rows) == 0:
            raise ValueError(f"{dataset}: no {cfg.split} samples with {'+'.join(self.views.sensors)}")
        self.partners = self._partners(dataset)
        self.global_batch = cfg.batch_size * self.world_size
        self.position = position or LoaderPosition()
        self.device = cfg.device if cfg.device != "auto" else _auto_device()
        self.device_id = int(os.environ.get("LOCAL_RANK", 0)) if self.device == "gpu" else None
        spec = self.views.input_spec
        mean, std = spec.normalisation(self.manifest)
        slices = spec.sensor_slices()
        self.norm = {s: (mean[sl], std[sl]) for s, sl in slices.items()}
        self._iterator = None
        self._pipe = None
        self._readers = None  # what DALI's external source calls (batch_source)
        self._built_at: LoaderPosition | None = None
        self._augment_pool = None  # CPU mode: the threads torch's views are made in (made when needed)
        self.substituted = 0  # this rank's samples skipped as corrupt in the whole run (resumes included)
        self.corrupt_shards: dict[str, int] = {}  # shard URL -> samples skipped from it in the whole run
        self.epoch_substituted = (self.position.epoch, 0)  # (epoch, samples skipped in it): the stop rule
        self.checksums = self.catalog.crc32c is not None
        if not self.checksums:
            warnings.warn(
                f"{dataset}: the catalog records no member checksums (written by an older eossl): samples "
                "are read without checking their bytes; ingest the dataset again to check them",
                stacklevel=2,
            )

    def _partners(self, dataset: str) -> SeasonPartners | None:
        """The temporal mode's partners (``temporal.py``); refused where a scene is not one location's
        seasons. Samples without another season of their location in the set are counted and warned of."""
        if self.views.sources == 1:
            return None
        fmt = self.manifest.get("source", {}).get("format", "sen12ms")
        if fmt not in TEMPORAL_SOURCES:
            raise ValueError(
                f"{dataset}: view mode 'temporal' pairs seasons of one location, which a {fmt} dataset does "
                f"not hold (its scenes are not locations); use it on {' or '.join(TEMPORAL_SOURCES)}"
            )
        partners = SeasonPartners.build(self.rows, self.catalog.scene_id)
        if partners.alone:
            warnings.warn(
                f"{dataset}: {partners.alone} of {len(self.rows)} samples have no other season of their "
                "location in the sample set: both of their views come from one acquisition",
                stacklevel=3,
            )
        return partners

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
            "draw_rule": DRAW_RULE,
            **({"nodes": self.cfg.plan.nodes} if self.cfg.plan.node_affinity else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"cannot resume: global batch was {state['global_batch']}, now {self.global_batch} "
                "(keep batch_size x world size constant to resume exactly)"
            )
        if state["rows_digest"] != rows_digest(self.rows) or state["seed"] != self.cfg.plan.seed:
            raise ValueError("cannot resume: the sample set or seed differs from the checkpoint's")
        recorded = state.get(
            "draw_rule", "numpy generator per sample and view"
        )  # before the rule was recorded
        if recorded != DRAW_RULE:
            raise ValueError(
                f"cannot resume exactly: the checkpoint's view parameters were drawn by {recorded!r}, this "
                f"eossl draws them by {DRAW_RULE!r}, so every view after the resume would differ from the "
                "run's own. Finish the run with the eossl that started it, or start a new run folder"
            )
        if self.cfg.plan.node_affinity and state.get("nodes", 1) != self.cfg.plan.nodes:
            raise ValueError(
                f"cannot resume: node_affinity shared the shards out over {state.get('nodes', 1)} nodes, "
                f"now {self.cfg.plan.nodes} (resume on as many nodes, or turn node_affinity off)"
            )
        self.position = LoaderPosition(state["epoch"], state["step"])
        self._close_iterator()

    def corrupt_state(self) -> dict:
        """This rank's counts of skipped samples, for the checkpoint (shards by their manifest path, so the
        counts survive a dataset that moved)."""
        prefix = f"{self.dataset.rstrip('/')}/"
        epoch, in_epoch = self.epoch_substituted
        return {
            "substituted": self.substituted,
            "epoch": epoch,
            "epoch_substituted": in_epoch,
            "shards": {url.removeprefix(prefix): n for url, n in sorted(self.corrupt_shards.items())},
        }

    def load_corrupt_state(self, ranks: list[dict]) -> None:
        """Continue the counts of ``corrupt_state`` of every rank of the checkpoint (one dict per rank).

        On the same world size each rank takes its own. On another, rank 0 takes the run's totals (so the
        logged total, a sum over ranks, stays right) and the per-epoch counts restart: the ranks' shares
        of the epoch are not the ones counted before.
        """
        prefix = f"{self.dataset.rstrip('/')}/"
        if len(ranks) == self.world_size:
            own = ranks[self.rank]
            self.substituted = int(own["substituted"])
            self.corrupt_shards = {prefix + path: int(n) for path, n in own["shards"].items()}
            self.epoch_substituted = (int(own["epoch"]), int(own["epoch_substituted"]))
            return
        self.substituted, self.corrupt_shards = 0, {}
        self.epoch_substituted = (self.position.epoch, 0)
        if self.rank == 0:
            for state in ranks:
                self.substituted += int(state["substituted"])
                for path, n in state["shards"].items():
                    self.corrupt_shards[prefix + path] = self.corrupt_shards.get(prefix + path, 0) + int(n)

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
            self.views.patch_size,
            self.partners,
        )

    def batch_source(self):
        """What DALI's external source calls for a batch: the ``SampleSource`` itself (read in the main
        process, or in DALI's parallel workers with ``readers='dali'``), or the shared-memory readers
        that run it in reader processes."""
        source = self.sample_source()
        if self.cfg.workers == 0 or self.cfg.readers == "dali":
            return source
        from .shared_readers import SharedMemoryReaders

        return SharedMemoryReaders(source, self.cfg.workers, self.cfg.prefetch, self.cfg.reader_timeout_s)

    def _build(self):
        from .dali_pipeline import DALIGenericIterator, build_pipeline, view_inputs

        self._readers = self.batch_source()
        pipe = build_pipeline(
            self._readers,
            self.views,
            self.norm,
            self.cfg.batch_size,
            self.device,
            self.device_id,
            self.cfg.num_threads,
            self.cfg.workers,
            self.cfg.prefetch,
            seed=self.cfg.plan.seed,
            s2_stored=stored_s2_bands(self.manifest),
            views_in_graph=self.views_in_graph,
        )
        n = len(self.views.views)
        if self.views_in_graph:
            names = [f"view{v}" for v in range(n)] + ["ids"]
        else:
            params = [f"{p}{v}" for v in range(n) for p in ("matrix", "gain", "offset", "sigma")]
            names = [f"input{k}" for k in range(len(view_inputs(self.views)[0]))] + ["ids", *params]
        self._iterator = DALIGenericIterator([pipe], names, auto_reset=False, prepare_first_batch=False)
        self._pipe = pipe
        self._built_at = self.position

    @property
    def views_in_graph(self) -> bool:
        """Whether DALI's graph makes the views (on a GPU; in CPU mode with ``cpu_augment='dali'``)."""
        return self.device == "gpu" or self.cfg.cpu_augment == "dali"

    def _views(self, out: dict) -> list[torch.Tensor]:
        """The batch's views (B, C, H, W) from the pipeline's outputs: DALI's views, or torch's made from
        the standardised inputs and the views' parameters (``torch_augment``)."""
        n = len(self.views.views)
        if self.views_in_graph:
            return [out[f"view{v}"].permute(0, 3, 1, 2) for v in range(n)]
        from .dali_pipeline import view_inputs
        from .torch_augment import augment_batch, single_thread_pool

        if self._augment_pool is None:
            self._augment_pool = single_thread_pool(self.cfg.num_threads)
        _, index = view_inputs(self.views)
        inputs = [out[f"input{k}"].permute(0, 3, 1, 2) for k in range(max(index) + 1)]
        return [
            augment_batch(
                inputs[index[v]],
                *(out[f"{p}{v}"] for p in ("matrix", "gain", "offset", "sigma")),
                view.size,
                pool=self._augment_pool,
            )
            for v, view in enumerate(self.views.views)
        ]

    def _worker_pids(self) -> list[int]:
        if hasattr(self._readers, "pids"):
            return self._readers.pids()
        pool = getattr(self._pipe, "_py_pool", None)
        return pool.pids() if pool is not None else []

    def _check_workers(self, epoch: int, where: str) -> None:
        """Raise when a reader worker process is gone, before DALI hands it work (``worker_watch``: DALI
        would wait for ever on a worker that died idle). A worker that dies while DALI has the main thread
        is caught by the watch instead."""
        dead = dead_processes(self._worker_pids())
        if dead:
            self._close_iterator()
            raise StreamingError(
                f"streaming {self.dataset} failed at epoch {epoch} step {self.position.step} ({where}): "
                f"reader worker process(es) {', '.join(map(str, dead))} died (killed, or out of memory)"
            )

    def _count_corrupt(self, batch: Batch) -> None:
        """Count a batch's replaced samples per shard; stop above ``max_corrupt_fraction`` of an epoch."""
        self.substituted += batch.substituted
        epoch, in_epoch = self.epoch_substituted
        in_epoch = (in_epoch if epoch == batch.epoch else 0) + batch.substituted
        self.epoch_substituted = (batch.epoch, in_epoch)
        for shard in batch.corrupt_shards:
            url = f"{self.dataset.rstrip('/')}/{self.manifest['shards'][shard]['path']}"
            self.corrupt_shards[url] = self.corrupt_shards.get(url, 0) + 1
        warnings.warn(
            f"epoch {batch.epoch} step {batch.step}: {batch.substituted} samples of corrupt or truncated "
            f"shards replaced by the next readable ones ({self.substituted} so far)",
            stacklevel=3,
        )
        per_epoch = len(self) * self.cfg.batch_size
        if in_epoch > self.cfg.max_corrupt_fraction * per_epoch:
            self._close_iterator()
            named = ", ".join(f"{url} ({n})" for url, n in sorted(self.corrupt_shards.items()))
            raise CorruptDataError(
                f"{in_epoch} samples skipped as corrupt in epoch {batch.epoch}, more than "
                f"max_corrupt_fraction={self.cfg.max_corrupt_fraction} of this rank's {per_epoch} samples "
                f"per epoch; samples skipped per shard in the run: {named} (eossl verify --deep names "
                "every damaged member)"
            )

    def _close_iterator(self) -> None:
        if hasattr(self._readers, "close"):
            self._readers.close()
        self._readers = None
        self._iterator = None
        self._pipe = None
        self._built_at = None

    def __iter__(self):
        steps = self.plan().steps
        if self.position.step >= steps:
            self.position = LoaderPosition(self.position.epoch + 1, 0)
        if self._iterator is None or self._built_at is None:
            self._build()
        epoch = self.position.epoch
        watch = WorkerWatch(self._worker_pids)
        try:
            watch.__enter__()
            while True:
                self._check_workers(epoch, "reading the next batch")
                try:
                    with watch.armed():
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
                        f"{self.position.step}: {lines[-1] if lines else repr(exc)}"
                    ) from exc
                ids = out["ids"]
                batch = Batch(
                    views=self._views(out),
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
            self._check_workers(epoch, "at the epoch's end, before the next epoch is handed to the workers")
            try:
                with watch.armed():
                    self._iterator.reset()
            except WorkerGone as exc:
                self._close_iterator()
                raise StreamingError(
                    f"streaming {self.dataset} failed at the end of epoch {epoch}: {exc}"
                ) from exc
        except GeneratorExit:  # the consumer stopped mid-epoch: DALI has prefetched past our position
            self._close_iterator()
            raise
        finally:
            watch.__exit__(None, None, None)
        self.position = LoaderPosition(epoch + 1, 0)
