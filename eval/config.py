"""What every evaluation grid is configured with, and how a command line becomes that config.

``GridConfig`` holds the settings all grids share (dataset, output, checkpoints, columns, budget, seeds,
protocol, precision, MLflow experiment); a task's config extends it with its own fields and sections.
The dataclass defaults are the only defaults: ``load_grid_config`` applies, in this order, a YAML file,
``--set key=value`` assignments and the flags the user typed (train's resolver, so the dialect and its
errors are the same as ``eossl train``'s), then checks the fields that depend on each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from eossl.train.overrides import apply_overrides, read_yaml_overrides

__all__ = [
    "INITS",
    "AttentionConfig",
    "PRECISIONS",
    "ClassifyConfig",
    "GridConfig",
    "ProbeConfig",
    "SegTrainConfig",
    "SegmentConfig",
    "field_default",
    "load_grid_config",
]

PRECISIONS = ("no", "bf16")
# checkpoint: backbone and its adapter; checkpoint-random-adapter: pre-trained backbone behind a fresh 1x1
# adapter; checkpoint-backbone-only: the backbone without its adapter (an RGB-shaped backbone then takes the
# S2 B4, B3, B2 bands directly); random: everything freshly initialised (supervised from scratch).
INITS = ("random", "checkpoint", "checkpoint-random-adapter", "checkpoint-backbone-only")

C = TypeVar("C", bound="GridConfig")


@dataclass
class AttentionConfig:
    """What ``eossl attention`` derives from a ViT's maps.

    Attributes:
        keep_mass: attention mass each head's mask keeps (0.6, the value of DINO's figures).
        n_clusters: k-means clusters of the patch tokens (6: about the number of land-cover classes a
            SEN12MS patch holds).
    """

    keep_mass: float = 0.6
    n_clusters: int = 6


@dataclass
class GridConfig:
    """An evaluation grid: rows are methods, columns inputs, a cell the mean over seeds.

    Attributes:
        dataset: dataset folder or URL (with data.zarr and subsets.json).
        out: folder for results.csv/.md, per-cell metrics and figures (and the local MLflow store).
        checkpoints: pre-training run folders to evaluate.
        inputs: columns of the table (s1, s2, s1s2).
        s2_bands: S2 bands of the inputs ('land' = the 10 benchmark bands, 'all' = 13).
        budget: training labels per cell: a budget written by ingest (e.g. 1024) or 'all' (the train split).
        protocol: how the model is trained on the labels; the task's ``PROTOCOLS`` name the choices.
        seeds: one budget subset and head initialisation per seed.
        label: the classes to predict (the task says which schemes it knows).
        inits: rows: 'random' and/or checkpoint inits (see INITS).
        precision: 'no' or 'bf16' (autocast through accelerate, as in training).
        experiment: MLflow experiment.
    """

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("linear",)

    dataset: str
    out: str
    checkpoints: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("s1", "s2", "s1s2")
    s2_bands: str = "land"
    budget: str = "1024"
    protocol: str = "linear"
    seeds: tuple[int, ...] = (0,)
    label: str = "igbp_simple"
    inits: tuple[str, ...] = ("random", "checkpoint")
    precision: str = "no"
    experiment: str = "eossl-eval"

    def __post_init__(self) -> None:
        """Normalise what a YAML file or ``--set`` gives (lists, numbers as text); check each field alone."""
        self.checkpoints, self.inputs = tuple(self.checkpoints), tuple(self.inputs)
        self.inits = tuple(self.inits)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.budget = str(self.budget)
        if self.protocol not in self.PROTOCOLS:
            raise ValueError(f"protocol must be one of {self.PROTOCOLS}, got {self.protocol!r}")
        bad = [i for i in self.inits if i not in INITS]
        if bad:
            raise ValueError(f"unknown init {bad}; choose from {INITS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be no or bf16, got {self.precision!r}")
        if self.budget != "all" and not self.budget.isdigit():
            raise ValueError(f"budget must be a number of labels or 'all', got {self.budget!r}")

    def validate(self) -> None:
        """Checks across fields, once every source is applied (a file may set inits before checkpoints)."""
        if any(i != "random" for i in self.inits) and not self.checkpoints:
            raise ValueError("checkpoint inits need at least one --checkpoint RUN_DIR")


@dataclass
class ProbeConfig:
    """Training of the classifier.

    Attributes:
        batch_size: images per batch for feature extraction and fine-tuning.
        workers: DataLoader workers reading the Zarr store.
        linear_epochs: full-batch L-BFGS iterations of the linear probe.
        linear_weight_decay: L2 penalty of the linear probe (on standardised features).
        knn_k, knn_temperature: neighbours and the temperature of the similarity weights (DINO's 20, 0.07).
        knn_memory_mb: size of one block of test x train similarities (float32); k-NN keeps a running
            top-k over such blocks instead of the whole matrix. Any size gives the same neighbours; the
            peak memory of the search is about 3.5x this (measured, docs/BENCHMARKS.md).
        finetune_epochs, finetune_lr, finetune_weight_decay: AdamW fine-tuning of all layers.
    """

    batch_size: int = 32
    workers: int = 0
    linear_epochs: int = 100
    linear_weight_decay: float = 1e-4
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_memory_mb: float = 64.0
    finetune_epochs: int = 10
    finetune_lr: float = 3e-4
    finetune_weight_decay: float = 1e-4


@dataclass
class SegTrainConfig:
    """Optimisation of one cell.

    Attributes:
        epochs: passes over the labelled patches (the budget is small: 20-50 epochs are usual).
        batch_size: patches (crops) per step.
        lr: AdamW learning rate of the head (1e-3 suits both heads on standardised features).
        backbone_lr_scale: the encoder's learning rate relative to the head's when fine-tuning (0.1: a
            pre-trained encoder moves less than the fresh head; ``segment`` sets 1 for a random-init encoder).
        weight_decay: AdamW weight decay (all parameters).
        crop: training crop size in px (a random crop per batch); 0 trains on whole patches. Evaluation
            always runs on whole patches. Smaller crops make training cheaper, not the hold-out scores.
        class_weighting: ``none``, ``inverse_sqrt`` (default) or ``median_frequency`` (data.class_weights).
        workers: DataLoader workers reading the Zarr store.
        decoder_width: channels of the decoder heads.
    """

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    crop: int = 0
    class_weighting: str = "inverse_sqrt"
    workers: int = 0
    decoder_width: int = 128


@dataclass
class ClassifyConfig(GridConfig):
    """A scene classification grid (``eossl eval classify``); the shared fields are ``GridConfig``'s.

    Attributes:
        label: 'igbp_simple' (10 classes) or 'igbp' (17); 'bigearthnet19' (19, multi-label) on a
            BigEarthNet-MM dataset.
        multilabel: multi-label targets (classes above the ingest threshold) instead of the majority class.
        random_backbone: timm model for the random init (default: the first checkpoint's backbone).
        metric: headline metric of the table (default: overall_accuracy; mAP for multi-label).
        probe: classifier training settings.
    """

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("linear", "finetune", "knn")

    multilabel: bool = False
    random_backbone: str | None = None
    metric: str | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def headline(self) -> str:
        return self.metric or ("map" if self.multilabel else "overall_accuracy")


@dataclass
class SegmentConfig(GridConfig):
    """A land-cover segmentation grid (``eossl eval segment``); the shared fields are ``GridConfig``'s.

    Attributes:
        budget: labelled training patches per cell (segmentation needs far fewer than classification).
        label: per-pixel classes: igbp_simple (10), igbp (17), lccs_lc, lccs_lu, lccs_sh
            (segment.data.SEG_LABELS).
        frozen: override whether the backbone is frozen (None: frozen for linear, trained for finetune).
        train: optimisation of a cell.
        figures: hold-out patches drawn per cell (first seed); 0 draws none.
        write_maps: write every hold-out prediction of the first seed as a GeoTIFF (cells/<cell>/maps/), in
            the class colours, and one VRT per scene mosaicking its patches.
        attention_patches: hold-out patches scored with the unsupervised ViT maps (0: skip those rows).
    """

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("linear", "finetune")

    budget: str = "32"
    frozen: bool | None = None
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    figures: int = 3
    write_maps: bool = False
    attention_patches: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        from .segment.data import label_scheme  # the label tables need torch: only when a config is built

        label_scheme(self.label)

    def validate(self) -> None:
        if not self.checkpoints:
            raise ValueError(
                "segmentation needs at least one --checkpoint RUN_DIR (it also fixes the "
                "architecture of the random init)"
            )
        super().validate()

    @property
    def is_frozen(self) -> bool:
        return self.protocol == "linear" if self.frozen is None else self.frozen

    @property
    def head(self) -> str:
        return "linear" if self.protocol == "linear" else "decoder"


def field_default(cls: type, key: str) -> Any:
    """The dataclass default of a dotted field (``probe.batch_size``): what ``--help`` shows."""
    head, _, rest = key.partition(".")
    field = next((f for f in dataclasses.fields(cls) if f.name == head), None)
    if field is None:
        raise ValueError(f"{cls.__name__} has no field {head!r}")
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        raise ValueError(f"{cls.__name__}.{head} has no default")
    return field_default(type(value), rest) if rest else value


def load_grid_config(
    cls: type[C],
    required: Mapping[str, Any],
    config_file: str | None = None,
    assignments: Iterable[tuple[str, Any]] = (),
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Dataclass defaults <- YAML file <- ``--set`` assignments <- flags typed on the command line.

    Args:
        cls: the task's config (a ``GridConfig``).
        required: the fields without a default (dataset, out).
        config_file: YAML of config keys (nested sections or dotted keys).
        assignments: ``(key, value)`` pairs of ``--set``, values as typed.
        flags: dotted key -> value of the flags the user gave (none of their defaults).

    Raises:
        ValueError: an unknown or ambiguous key (with the keys it could mean), a bad value (with its key),
            or fields that contradict each other.
    """
    cfg = cls(**required)
    if config_file:
        apply_overrides(cfg, read_yaml_overrides(config_file))
    apply_overrides(cfg, dict(assignments))
    apply_overrides(cfg, dict(flags or {}))
    cfg.validate()
    return cfg
