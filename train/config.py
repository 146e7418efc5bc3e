"""Training configuration: typed dataclasses, a YAML file and ``--set key=value`` overrides, merged once.

``load_config(method, yaml_path, overrides)`` is the only place values are merged; the result is written
to the run folder (``config.yaml``) and logged to MLflow as params. Keys of ``--set`` are dotted paths
(``optim.lr=0.06``) or a unique field name (``queue_size=64``); a key naming a section takes that section's
``name`` (``backbone=resnet18`` sets ``backbone.name``); the other methods' sections are not searched
(``hidden`` is ``moco.hidden`` for MoCo, ``dino.hidden`` for DINO), and a short name still shared is an
error listing the full keys (``momentum``: ``optim.momentum`` or ``moco.momentum``). See ``overrides``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from eossl.streaming.inputs import InputSpec
from eossl.streaming.loader import LoaderConfig
from eossl.streaming.plan import PlanConfig
from eossl.streaming.storage import StorageOptions
from eossl.streaming.views import ViewConfig

from . import overrides as overrides_mod
from .methods import get_method, method_names
from .overrides import config_keys, read_yaml_overrides

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "DinoConfig",
    "MoCoConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "flatten",
    "load_config",
]


@dataclass
class BackboneConfig:
    """The encoder: a timm model plus an input adapter.

    Attributes:
        name: any timm model name (resnet50 for the MoCo study; resnet18 for CPU runs; vit_small_patch16_224).
        adapter: how a C-channel input reaches the backbone: 'native' (timm's ``in_chans=C``: the first
            layer is built for C channels), 'conv1x1' (a 1x1 conv + BN + ReLU block mapping C channels to
            ``adapter_channels``, one block per sensor in pair mode, so an RGB-shaped backbone sees every
            sensor), or 'zeropad' (channels padded with zeros to ``pad_channels``).
        adapter_mode: for 'conv1x1': 'trainable' (learned with the backbone), 'frozen' (a fixed, seeded
            random projection: parameters and BN statistics never change), 'random' (re-initialised at
            the start of every stage, then trained; at evaluation: a fresh adapter on a pre-trained
            backbone).
        adapter_channels: output channels of the 1x1 adapter (3: the shape of ImageNet stems).
        pad_channels: channel count for 'zeropad' (15 = S1 + all 13 S2 bands).
    """

    name: str = "resnet50"
    adapter: str = "native"
    adapter_mode: str = "trainable"
    adapter_channels: int = 3
    pad_channels: int = 15

    def __post_init__(self) -> None:
        if self.adapter not in ("native", "conv1x1", "zeropad"):
            raise ValueError(f"backbone.adapter must be native, conv1x1 or zeropad, got {self.adapter!r}")
        if self.adapter_mode not in ("trainable", "frozen", "random"):
            raise ValueError(
                f"backbone.adapter_mode must be trainable, frozen or random, got {self.adapter_mode!r}"
            )


@dataclass
class MoCoConfig:
    """MoCo-v2 (defaults of the study's code).

    Attributes:
        queue_size: negatives kept (65536); keys are written round the queue (any size works).
        dim: projection output dimension (128).
        hidden: projection MLP hidden width (2048 for ResNet-50).
        momentum: key encoder EMA momentum (0.999; lower, e.g. 0.99, for short runs and small data).
        temperature: softmax temperature of the InfoNCE loss (0.2).
        pairing: which view is the query: 'fixed' (the S2 view of a sensor pair, view 0 otherwise; the
            key sensor's adapter then only follows the query's by EMA and stays untrained), 'mixed' (half
            of each batch the fixed direction, the other half the other way round: both adapters train,
            as the MoCo study's released code) or 'symmetric' (both directions on every sample, averaged).
        shuffle_bn: stop BatchNorm from leaking the positive pair: keys are computed on a batch shuffled
            across ranks (multi-process) or in ``bn_splits`` shuffled chunks (one process).
        bn_splits: chunks of the key batch in one process (2); ignored with several ranks.
    """

    queue_size: int = 65536
    dim: int = 128
    hidden: int = 2048
    momentum: float = 0.999
    temperature: float = 0.2
    pairing: str = "fixed"
    shuffle_bn: bool = True
    bn_splits: int = 2


@dataclass
class DinoConfig:
    """DINO (Caron et al. 2021); defaults of the paper's ViT-S/16 recipe.

    Attributes:
        out_dim: prototypes K of the head's last layer (65536).
        hidden, bottleneck, nlayers: head MLP (2048 hidden, 256 bottleneck, 3 layers).
        norm_last_layer: weight-normalised last layer with fixed norm (True is more stable; False can
            train better ViT-S but may need a lower teacher temperature).
        momentum_teacher: teacher EMA momentum at the start; cosine-increased to 1.0 at the end.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: teacher softmax temperature warmed
            up linearly (0.04 -> 0.04 by default; 0.07 with 30 warm-up epochs is the long-run recipe).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA of the teacher output center (0.9).
        freeze_last_layer_epochs: epochs during which the last layer gets no update (1).
        weight_decay_end: final weight decay of the cosine schedule (0.4; start: optim.weight_decay).
        drop_path: stochastic depth rate of the student ViT (0.1).
    """

    out_dim: int = 65536
    hidden: int = 2048
    bottleneck: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_epochs: int = 1
    weight_decay_end: float = 0.4
    drop_path: float = 0.1


@dataclass
class OptimConfig:
    """Optimiser and schedules.

    Attributes:
        name: 'sgd' (MoCo) or 'adamw'.
        lr: base learning rate at ``base_batch`` (0.03 for MoCo-v2 at 256).
        lr_scaling: 'none', 'linear' (lr * global_batch / base_batch) or 'sqrt'.
        base_batch: batch size at which ``lr`` is the learning rate.
        momentum, weight_decay: SGD momentum (0.9) and weight decay (1e-4).
        schedule: 'cosine' (to 0 over the run) or 'constant'.
        warmup_steps: linear warm-up steps from 0.
        warmup_epochs: warm-up in epochs (converted with the run's steps per epoch; adds to warmup_steps).
        min_lr: final learning rate of the cosine schedule.
        clip_grad: max global grad norm; 0 disables clipping.
    """

    name: str = "sgd"
    lr: float = 0.03
    lr_scaling: str = "none"
    base_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    clip_grad: float = 0.0


@dataclass
class DataConfig:
    """What the loader reads and how views are made (see docs/METHODS.md).

    The defaults are those of the streaming configs each field feeds (``ViewConfig``, ``LoaderConfig``,
    ``PlanConfig``, ``StorageOptions``), read from them so that each default is stated once.

    Attributes:
        mode: single | pair | fusion_all | fusion_partial | fusion_optional | multicrop.
        sensors: input of 'single'/'multicrop' views: s1, s2 or s1s2.
        s2_bands: 'land' (10), 'all' (13), 'rgb' or a comma list.
        size: view size in pixels.
        augment: augment views (False: full patches, e.g. sensor pairs without augmentation).
        split: which split to train on (train, test, all).
        workers, threads: reader processes and DALI threads per rank.
        shuffle_buffer: samples in the shuffle buffer.
        cache_dir: node-local cache for remote shards (shared by the node's ranks and workers).
        cache_gb: bound on the cache (least recently used shards are evicted); size it to hold at least
            the shards of a few steps of every rank on the node (docs/SCALING.md).
        retries, timeout_s: attempts after a failed object-store request, and each request's timeout.
        device: DALI device: auto, gpu or cpu.
        on_corrupt, max_corrupt_fraction: a sample whose bytes fail their check 'fail's the run or is
            'skip'ped (replaced, counted as ``replaced_samples``) until more than this fraction of an
            epoch's samples were skipped on a rank (see ``LoaderConfig``).
        n_local, local_size: DINO multi-crop: local crops per sample and their size (global crops use
            ``size``; scales as in DINO: global 0.4-1, local 0.05-0.4).
    """

    mode: str = ViewConfig.mode
    sensors: str = "s2"
    s2_bands: str = InputSpec.s2_bands
    size: int = ViewConfig.size
    augment: bool = True
    split: str = LoaderConfig.split
    workers: int = LoaderConfig.workers
    threads: int = LoaderConfig.num_threads
    shuffle_buffer: int = PlanConfig.shuffle_buffer
    cache_dir: str | None = StorageOptions.cache_dir
    cache_gb: float = StorageOptions.cache_bytes / 2**30
    retries: int = StorageOptions.retries
    timeout_s: float = StorageOptions.timeout_s
    device: str = LoaderConfig.device
    on_corrupt: str = LoaderConfig.on_corrupt
    max_corrupt_fraction: float = LoaderConfig.max_corrupt_fraction
    n_local: int = ViewConfig.n_local
    local_size: int = ViewConfig.local_size


@dataclass
class TrainConfig:
    """One pre-training run.

    Attributes:
        method: a registered method (``train/methods.py``): 'moco' or 'dino'.
        data: dataset folder or URL; out: run folder (checkpoints, config, local MLflow store).
        batch_size: samples per device per step (64 in the MoCo study).
        epochs: epochs over the training split; max_steps: stop after this many optimiser steps (0 = none).
        grad_accum: micro-batches per optimiser step (effective batch = batch_size x ranks x grad_accum).
        precision: 'auto' (the launcher's: ``mixed_precision`` of the accelerate config file, else 'no'),
            'no', 'bf16' or 'fp16' (fp16 uses a loss scaler).
        channels_last: NHWC memory format for convolutions.
        compile: torch.compile the model.
        seed: seed of everything (data order, augmentation, initialisation).
        log_every: steps between metric logs; ckpt_every: steps between checkpoints (0: only at the end).
        experiment: MLflow experiment name.
        max_nonfinite_steps: stop with an error after this many consecutive non-finite losses (each is
            skipped on every rank, counted and logged as ``nonfinite_steps``).
    """

    method: str = "moco"
    data: str = ""
    out: str = ""
    batch_size: int = LoaderConfig.batch_size
    epochs: int = 200
    max_steps: int = 0
    grad_accum: int = 1
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    experiment: str = "eossl"
    max_nonfinite_steps: int = 20
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"method must be one of {', '.join(method_names())}, got {self.method!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, no, bf16 or fp16, got {self.precision!r}")
        if not self.data or not self.out:
            raise ValueError("data and out must be set")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.optim.lr_scaling not in ("none", "linear", "sqrt"):
            raise ValueError(f"optim.lr_scaling must be none, linear or sqrt, got {self.optim.lr_scaling!r}")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.optim.schedule!r}")


# --- merging ----------------------------------------------------------------------------------------


def _other_methods(cfg: TrainConfig) -> tuple[str, ...]:
    """Sections of the methods not running: a short key never means them (``hidden`` is MoCo's for MoCo)."""
    return tuple(m for m in method_names() if m != cfg.method)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set fields from a flat mapping of keys (dotted or unique) to values (strings are parsed)."""
    return overrides_mod.apply_overrides(cfg, overrides, skip_sections=_other_methods(cfg))


def load_config(method: str, yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Method defaults <- YAML file <- ``--set`` overrides (and CLI flags, passed as overrides).

    The method defaults are the method class's ``config_defaults`` (DINO: its ViT-S/16 recipe), applied
    over the dataclass defaults.
    """
    if method not in method_names():
        raise ValueError(f"method must be one of {list(method_names())}, got {method!r}")
    cfg = apply_overrides(TrainConfig(method=method), get_method(method).config_defaults)
    if yaml_path:
        apply_overrides(cfg, read_yaml_overrides(yaml_path))
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted key -> value of the running method, for MLflow params and the resume digest.

    The sections of the methods not running are left out: a MoCo run's params hold no ``dino.*`` key (their
    values never reach the run, so listing them would only mislead whoever compares runs).
    """
    other = tuple(f"{m}." for m in _other_methods(cfg))
    return {
        path: getattr(owner, name)
        for path, (owner, name) in config_keys(cfg).items()
        if not path.startswith(other)
    }


def to_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml: every field of the running method (other methods' sections left out)."""
    tree = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for method in _other_methods(cfg):
        tree.pop(method, None)
    return yaml.safe_dump(tree, sort_keys=False)
