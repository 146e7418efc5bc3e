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
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eossl.streaming.augment import PRESETS, AugmentConfig, preset
from eossl.streaming.inputs import InputSpec
from eossl.streaming.loader import CPU_AUGMENT, READERS, LoaderConfig
from eossl.streaming.plan import PlanConfig
from eossl.streaming.storage import StorageOptions
from eossl.streaming.views import ViewConfig

from . import overrides as overrides_mod
from .methods import config_defaults, method_names
from .overrides import config_keys, read_yaml_overrides
from .schedules import scaled_lr

__all__ = [
    "NORMALISATIONS",
    "WEIGHTS_INPUT_NAMES",
    "BackboneConfig",
    "DataConfig",
    "DinoConfig",
    "MoCoConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "describe",
    "find_config",
    "flatten",
    "load_config",
    "method_defaults",
    "recipe_names",
]


# The choices of backbone.normalisation and backbone.weights_input, named here so that a config is
# checked without importing torch (train/input_norm.py and train/weights.py implement them).
NORMALISATIONS = ("auto", "weights", "dataset")
WEIGHTS_INPUT_NAMES = ("ssl4eo_s2", "ssl4eo_s1", "rgb", "unknown")


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
        weights: starting weights (None: random initialisation): ``timm:NAME`` (timm's pretrained
            weights, read from the local cache only), a weights file (``.safetensors`` or a torch state
            dict, e.g. torchgeo's SSL4EO-S12 weights) or an eossl run / exported ``backbone/`` folder.
            See ``train/weights.py`` and docs/METHODS.md.
        weights_input: the input a weights *file* was trained on: ssl4eo_s2 (13 S2 bands / 10,000),
            ssl4eo_s1 (VV, VH, SSL4EO-S12's standardisation), rgb (S2 B4, B3, B2) or unknown (the
            first layer is adapted by count). Required for a plain file; timm names and eossl runs say it.
        normalisation: the encoder's input normalisation: 'auto' (the weights' when they declare one,
            else the dataset's per-channel standardisation), 'weights' (an error when they declare none)
            or 'dataset'. Recorded in the model card and MLflow.
    """

    name: str = "resnet50"
    adapter: str = "native"
    adapter_mode: str = "trainable"
    adapter_channels: int = 3
    pad_channels: int = 15
    weights: str | None = None
    weights_input: str | None = None
    normalisation: str = "auto"

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"backbone.normalisation must be one of {', '.join(NORMALISATIONS)}, "
                f"got {self.normalisation!r}"
            )
        if self.weights_input is not None and self.weights_input not in WEIGHTS_INPUT_NAMES:
            raise ValueError(
                f"backbone.weights_input must be one of {', '.join(WEIGHTS_INPUT_NAMES)}, "
                f"got {self.weights_input!r}"
            )
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
        lr_scaling: 'linear' (lr * effective_batch / base_batch: MoCo-v2's and DINO's rule, Goyal et al.),
            'sqrt' or 'none' (``lr`` whatever the batch); the resolved lr is printed and logged.
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
    lr_scaling: str = "linear"
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
        mode: single | pair | fusion_all | fusion_partial | fusion_optional | multicrop | temporal
            (the two views from two seasons of one location: SSL4EO-S12 datasets).
        sensors: input of 'single'/'multicrop'/'temporal' views: s1, s2 or s1s2.
        s2_bands: 'land' (10), 'all' (13), 'rgb' or a comma list.
        size: view size in pixels.
        augment: augment views (False: full patches, e.g. sensor pairs without augmentation).
        augment_preset: 'default' (MoCo-v2's random resized crop, flips, rotations, per-band jitter,
            blur; the sensors of a pair share one geometry) or 'moco_study' (the MoCo SEN12MS study's: no
            crop, flips, blur, affine distortion for elastic, brightness/contrast; S1 and S2 augmented
            independently). See docs/METHODS.md for both and a comparison.
        pair_geometry: sensor pairs: 'shared' (one crop/flip/rotation for S1 and S2: the same ground) or
            'independent'; unset: the preset's (default: shared, moco_study: independent).
        split: which split to train on (train, test, all).
        workers, threads: reader processes and DALI threads per rank.
        shuffle_buffer: samples in the shuffle buffer.
        node_affinity: each node reads a fixed share of the shards every epoch: turn on when ``cache_gb``
            is smaller than the dataset on several nodes (each node then downloads only its share once;
            samples mix within a share; resume needs the same number of nodes). docs/SCALING.md.
        cache_dir: node-local cache for remote shards (shared by the node's ranks and workers).
        cache_gb: bound on the cache (least recently used shards are evicted); size it to hold at least
            the shards of a few steps of every rank on the node (docs/SCALING.md).
        read_while_downloading: with a cache, read samples of a shard not yet on the node by ranged GETs
            while the whole shard downloads (the first epoch does not stall on downloads; up to twice
            its bytes); false (default, measured faster: docs/BENCHMARKS.md): wait for each shard's
            download, started ``lookahead_steps`` ahead.
        map_files: read shard files on this node (a local dataset, cached copies) by mapping them: the
            pipeline reads their bytes in the page cache, with no copy (default); false: ``pread`` every
            sample into shared memory, for file systems where mapping is slow or files that may shrink
            while read (see ``StorageOptions``).
        retries, timeout_s: attempts after a failed object-store request, and each request's timeout.
        device: DALI device: auto, gpu or cpu.
        cpu_augment: in CPU mode, 'torch' (default: torch's kernels make the views, ~3x cheaper) or 'dali'
            (DALI's graph on the CPU: exactly what a GPU run computes).
        readers: how reader processes hand batches to DALI: 'shared_memory' (default: read straight into
            shared memory DALI reads in place) or 'dali' (DALI's parallel external source: a copy of every
            batch between processes). See ``LoaderConfig``.
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
    augment_preset: str = "default"
    pair_geometry: str | None = None
    split: str = LoaderConfig.split
    workers: int = LoaderConfig.workers
    threads: int = LoaderConfig.num_threads
    shuffle_buffer: int = PlanConfig.shuffle_buffer
    node_affinity: bool = PlanConfig.node_affinity
    cache_dir: str | None = StorageOptions.cache_dir
    cache_gb: float = StorageOptions.cache_bytes / 2**30
    read_while_downloading: bool = StorageOptions.read_while_downloading
    map_files: bool = StorageOptions.map_files
    retries: int = StorageOptions.retries
    timeout_s: float = StorageOptions.timeout_s
    device: str = LoaderConfig.device
    cpu_augment: str = LoaderConfig.cpu_augment
    readers: str = LoaderConfig.readers
    on_corrupt: str = LoaderConfig.on_corrupt
    max_corrupt_fraction: float = LoaderConfig.max_corrupt_fraction
    n_local: int = ViewConfig.n_local
    local_size: int = ViewConfig.local_size

    def __post_init__(self) -> None:
        if self.augment_preset not in PRESETS:
            raise ValueError(
                f"loader.augment_preset must be one of {', '.join(PRESETS)}, got {self.augment_preset!r}"
            )
        if self.pair_geometry not in (None, "shared", "independent"):
            raise ValueError(
                f"loader.pair_geometry must be shared or independent, got {self.pair_geometry!r}"
            )
        if self.cpu_augment not in CPU_AUGMENT:
            raise ValueError(
                f"loader.cpu_augment must be one of {', '.join(CPU_AUGMENT)}, got {self.cpu_augment!r}"
            )
        if self.readers not in READERS:
            raise ValueError(f"loader.readers must be one of {', '.join(READERS)}, got {self.readers!r}")

    def augment_config(self) -> AugmentConfig:
        """The views' augmentation: the preset, or none with ``augment=false``."""
        return preset(self.augment_preset) if self.augment else AugmentConfig.none()

    def resolved_pair_geometry(self) -> str:
        """``pair_geometry``, or the preset's when unset."""
        if self.pair_geometry is not None:
            return self.pair_geometry
        return "independent" if self.augment_preset == "moco_study" else ViewConfig.pair_geometry


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
        compile_backend: its backend: 'inductor' (default: generated kernels, Triton on a GPU) or another of
            ``torch._dynamo.list_backends()``, e.g. 'aot_eager' (the same graph capture without code
            generation: to find graph breaks, or to tell a compiler bug from a model bug).
        seed: seed of everything (data order, augmentation, initialisation).
        log_every: steps between metric logs; ckpt_every: steps between checkpoints (0: only at the end).
        experiment: MLflow experiment name.
        system_metrics_every_s: sample the machine every this many seconds into the MLflow run (MLflow's
            system metrics: CPU, memory, disk, network, and GPU utilisation and memory, what a throughput
            study wants; rank 0's node only). 0: off. Needs ``psutil``, GPU figures ``pynvml``
            (``nvidia-ml-py``): without them the run says so and trains without (or without GPU figures).
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
    compile_backend: str = "inductor"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    experiment: str = "eossl"
    system_metrics_every_s: float = 0.0
    max_nonfinite_steps: int = 20
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: DataConfig = field(default_factory=DataConfig)

    def validate(self, require_paths: bool = True) -> None:
        """Check values that depend on each other; ``require_paths=False`` lets ``data``/``out`` be unset
        (printing a recipe)."""
        if self.method not in method_names():
            raise ValueError(f"method must be one of {', '.join(method_names())}, got {self.method!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, no, bf16 or fp16, got {self.precision!r}")
        if require_paths and (not self.data or not self.out):
            raise ValueError("data and out must be set")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.optim.lr_scaling not in ("none", "linear", "sqrt"):
            raise ValueError(f"optim.lr_scaling must be none, linear or sqrt, got {self.optim.lr_scaling!r}")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.optim.schedule!r}")
        if not self.system_metrics_every_s >= 0:
            raise ValueError(
                f"system_metrics_every_s must be >= 0 (0: off), got {self.system_metrics_every_s}"
            )


# --- merging ----------------------------------------------------------------------------------------


def _other_methods(cfg: TrainConfig) -> tuple[str, ...]:
    """Sections of the methods not running: a short key never means them (``hidden`` is MoCo's for MoCo)."""
    return tuple(m for m in method_names() if m != cfg.method)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set fields from a flat mapping of keys (dotted or unique) to values (strings are parsed)."""
    return overrides_mod.apply_overrides(cfg, overrides, skip_sections=_other_methods(cfg))


def method_defaults(method: str) -> TrainConfig:
    """The dataclass defaults with the method's ``config_defaults`` applied: what a run gets unless a
    config file or ``--set`` says otherwise."""
    if method not in method_names():
        raise ValueError(f"method must be one of {list(method_names())}, got {method!r}")
    return apply_overrides(TrainConfig(method=method), config_defaults(method))


def recipe_names() -> list[str]:
    """Names of the recipes shipped with eossl (``launch/recipes/NAME.yaml``)."""
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def _recipe_dir() -> Path:
    # Recipes are data files of the launch package, read as files: no launch code is imported.
    spec = importlib.util.find_spec("eossl.launch")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the eossl.launch package (which holds the recipes) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "recipes"


def find_config(name_or_path: str) -> Path:
    """A config file: an existing path, or the name of a shipped recipe (``moco_sen12ms``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = _recipe_dir() / f"{name_or_path}.yaml"
    if "/" not in name_or_path and recipe.is_file():
        return recipe
    raise ValueError(
        f"{name_or_path}: no such config file, and not a recipe name (recipes: {', '.join(recipe_names())})"
    )


def config_method(yaml_path: str | None, method: str | None) -> str:
    """The run's method: the command line's, else the config file's ``method`` key; they must agree."""
    from_file = read_yaml_overrides(yaml_path).get("method") if yaml_path else None
    if method and from_file and method != from_file:
        raise ValueError(
            f"{yaml_path}: the file is a {from_file!r} config, but the command asks for {method!r}"
        )
    if not (method or from_file):
        raise ValueError("name the method (moco or dino) or give a --config file that sets 'method'")
    return method or from_file


def load_config(
    method: str | None, yaml_path: str | None, overrides: dict[str, Any], require_paths: bool = True
) -> TrainConfig:
    """Method defaults <- YAML file <- ``--set`` overrides (and CLI flags, passed as overrides).

    The method defaults are the method class's ``config_defaults`` (DINO: its ViT-S/16 recipe), applied
    over the dataclass defaults. ``yaml_path`` may be a recipe name (see :func:`find_config`); ``method``
    may be None when the file sets it.
    """
    if yaml_path:
        yaml_path = str(find_config(yaml_path))
    cfg = method_defaults(config_method(yaml_path, method))
    if yaml_path:
        file_values = read_yaml_overrides(yaml_path)
        file_values.pop("method", None)
        apply_overrides(cfg, file_values)
    apply_overrides(cfg, overrides)
    cfg.validate(require_paths=require_paths)
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


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its line(s) in the class docstring's ``Attributes:`` section, joined."""
    docs: dict[str, str] = {}
    names: list[str] = []
    in_attributes = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes or not stripped:
            continue
        head = re.match(r"^ {8}(\w[\w, ]*): (.*)$", line)
        if head:
            names = [n.strip() for n in head.group(1).split(",")]
            for n in names:
                docs[n] = head.group(2)
        elif line.startswith(" " * 12):
            for n in names:
                docs[n] += " " + stripped
    return docs


def describe(cfg: TrainConfig, defaults: TrainConfig) -> str:
    """Every key of ``cfg`` as ``key: value  # default: D; doc``: valid YAML, usable as a config file.

    Args:
        cfg: the resolved configuration.
        defaults: what the method gets without a file or overrides (:func:`method_defaults`).
    """
    default_values = flatten(defaults)
    lines = [f"method: {cfg.method}"]
    for path, (owner, name) in config_keys(cfg).items():
        if path == "method" or path not in default_values:  # another method's section
            continue
        value, default = getattr(owner, name), default_values[path]
        doc = _field_docs(type(owner)).get(name, "")
        mark = "" if value == default else " (changed)"
        lines.append(f"{path}: {_scalar(value)}  # default: {_scalar(default)}{mark}; {doc}".rstrip("; "))
    o, per_rank = cfg.optim, cfg.batch_size * cfg.grad_accum
    per_ranks = ", ".join(
        f"{n} x {per_rank}: {scaled_lr(o.lr, o.lr_scaling, n * per_rank, o.base_batch):.4g}"
        for n in (1, 4, 8)
    )
    lines.append(f"# learning rate by ranks x (batch_size x grad_accum), {o.lr_scaling} rule: {per_ranks}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    """A value in YAML flow style, read back as the same value (tuples as lists)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).split("\n...")[0].strip()


def to_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml: every field of the running method (other methods' sections left out)."""
    tree = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for method in _other_methods(cfg):
        tree.pop(method, None)
    return yaml.safe_dump(tree, sort_keys=False)
