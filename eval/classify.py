"""``eossl eval classify``: SEN12MS scene classification of pre-trained backbones, as a results grid.

A grid cell is (method, input): a method is an initialisation (random, or a pre-training run with one
of the checkpoint inits), an input is s1, s2 or s1s2. Per cell and seed: the classifier is trained on the
label-budget subset written by ingest (``budget_<B>_seed<S>``, or the whole training split), evaluated on
the scene-level hold-out split, and the metrics are averaged over seeds. Invariants are asserted, not
assumed: the training rows hold exactly the budget, no hold-out scene is among them, and a frozen
backbone is bit-identical after a linear probe or k-NN. The grid itself (MLflow runs, tables) is
``grid.run_grid``'s; this module is the task: its rows, its per-seed cell and its summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from eossl.streaming.inputs import InputSpec
from eossl.streaming.zarr_dataset import ZarrPatchDataset
from eossl.train.checkpoint import state_digest
from eossl.train.export import read_model_card

from .config import ClassifyConfig
from .grid import CellOutcome, GridRow, GridTask, assert_scene_holdout, row_name, run_grid, training_subset
from .metrics import mean_and_spread, multi_label_metrics, single_label_metrics
from .models import NotApplicable, build_eval_encoder
from .probes import extract_features, finetune, knn_scores, linear_probe
from .report import plot_confusion

__all__ = ["ClassifyConfig", "ClassifyTask", "run_classification"]


@dataclass
class SeedResult:
    """One seed of a cell: its metrics, the confusion matrix (None for multi-label) and the class names."""

    metrics: dict
    confusion: np.ndarray | None
    classes: list[str]


def _datasets(cfg: ClassifyConfig, spec: InputSpec, seed: int):
    subset = training_subset(cfg.budget, seed)
    train = ZarrPatchDataset(cfg.dataset, spec, rows=subset, label=cfg.label, multilabel=cfg.multilabel)
    test = ZarrPatchDataset(cfg.dataset, spec, rows="test", label=cfg.label, multilabel=cfg.multilabel)
    if cfg.budget != "all" and len(train) != int(cfg.budget):
        raise NotApplicable(
            f"budget subset {subset} has {len(train)} usable samples, not {cfg.budget} "
            f"(excluded: {train.excluded})"
        )
    assert_scene_holdout(train.keys, test.keys)
    return train, test


def _one_seed(cfg: ClassifyConfig, row: GridRow, spec: InputSpec, seed: int, acc: Accelerator) -> SeedResult:
    train, test = _datasets(cfg, spec, seed)
    torch.manual_seed(seed)
    model = build_eval_encoder(row.init, spec.channel_names, train.mean, train.std, row.run_dir, row.backbone)
    n_classes = len(train.classes)
    if cfg.protocol == "finetune":
        scores = finetune(model, train, test, n_classes, cfg.multilabel, cfg.probe, seed, acc)
        y_test = test.labels()
    else:
        before = state_digest(model.encoder)
        xtr, ytr = extract_features(model, train, cfg.probe, acc)
        xte, y_test = extract_features(model, test, cfg.probe, acc)
        if state_digest(model.encoder) != before:
            raise AssertionError("the frozen backbone changed during feature extraction")
        if cfg.protocol == "linear":
            scores = linear_probe(xtr, ytr, xte, n_classes, cfg.multilabel, cfg.probe, seed)
        else:
            scores = knn_scores(xtr, ytr, xte, n_classes, cfg.multilabel, cfg.probe)
    if cfg.multilabel:
        metrics = multi_label_metrics(y_test, scores, 0.5, train.classes)
        confusion = None
    else:
        metrics = single_label_metrics(y_test, scores.argmax(1), n_classes, train.classes)
        confusion = np.asarray(metrics["confusion"])
    metrics["train_samples"] = len(train)
    metrics["test_samples"] = len(test)
    return SeedResult(metrics, confusion, list(train.classes))


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}


def _random_backbone(cfg: ClassifyConfig) -> str:
    """The random init's timm model: the config's, else the first run's with a model card, else resnet50."""
    if cfg.random_backbone is not None:
        return cfg.random_backbone
    for run in cfg.checkpoints:
        try:
            return read_model_card(run)["timm_model"]
        except FileNotFoundError:
            continue
    return "resnet50"


class ClassifyTask(GridTask):
    """Scene classification cells: a classifier per (row, input, seed), metrics averaged over seeds."""

    name = "classify"
    tags: dict[str, str] = {}
    cfg: ClassifyConfig

    @property
    def metric(self) -> str:
        return self.cfg.headline

    def title(self) -> str:
        cfg = self.cfg
        source = "BigEarthNet-MM" if cfg.label == "bigearthnet19" else "SEN12MS"
        return (
            f"{source} scene classification, {cfg.label} {'multi' if cfg.multilabel else 'single'}-label, "
            f"{cfg.protocol}, {cfg.budget} labels, metric {cfg.headline}"
        )

    def rows(self) -> list[GridRow]:
        cfg, backbone = self.cfg, _random_backbone(self.cfg)
        rows = [GridRow("random init", "random", None, backbone)] if "random" in cfg.inits else []
        for run in cfg.checkpoints:
            rows += [
                GridRow(row_name(run, init), init, run, backbone) for init in cfg.inits if init != "random"
            ]
        return rows

    def cell_params(self, row: GridRow, column: str, spec: InputSpec) -> dict:
        return {**super().cell_params(row, column, spec), "multilabel": self.cfg.multilabel}

    def run_seed(
        self, row: GridRow, spec: InputSpec, seed: int, folder: Path, first: bool, acc: Accelerator
    ) -> SeedResult:
        return _one_seed(self.cfg, row, spec, seed, acc)

    def summarise(self, cell: dict, per_seed: list[SeedResult], folder: Path, started: float) -> CellOutcome:
        cfg = self.cfg
        summary = {}
        for name in _scalar_metrics(per_seed[0].metrics):
            stats = mean_and_spread([s.metrics[name] for s in per_seed])
            summary[f"{name}_mean"], summary[f"{name}_std"] = stats["mean"], stats["std"]
        summary["seeds"] = len(per_seed)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(
            json.dumps(
                {"cell": cell, "summary": summary, "per_seed": [s.metrics for s in per_seed]}, indent=1
            )
        )
        artifacts = [str(folder / "metrics.json")]
        if per_seed[0].confusion is not None:
            confusion = sum(s.confusion for s in per_seed)
            png = plot_confusion(
                confusion,
                per_seed[0].classes,
                folder / "confusion.png",
                f"{cell['method']} / {cell['input']}: {cfg.protocol}, {cfg.budget} labels, "
                f"{len(per_seed)} seed(s) summed",
            )
            artifacts.append(str(png))
        values = {
            "mean": summary[f"{cfg.headline}_mean"],
            "std": summary[f"{cfg.headline}_std"],
            "n": len(per_seed),
            "seconds": round(time.perf_counter() - started, 1),
        }
        return CellOutcome(values, summary, artifacts)


def run_classification(
    cfg: ClassifyConfig,
    command: tuple[str, ...] = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Run the grid; write tables, per-cell metrics and figures; log to MLflow (parent + one child per cell).

    ``parent_run_id`` nests the grid's run under another (a study cell); ``tags`` are set on it.
    """
    return run_grid(ClassifyTask(cfg), command, parent_run_id, tags)
