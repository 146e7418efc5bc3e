"""``eossl eval classify``: SEN12MS scene classification of pre-trained backbones, as a results grid.

A grid cell is (method, input): a method is an initialisation (random, or a pre-training run with one
of the checkpoint inits), an input is s1, s2 or s1s2. Per cell and seed: the classifier is trained on the
label-budget subset written by ingest (``budget_<B>_seed<S>``, or the whole training split), evaluated on
the scene-level hold-out split, and the metrics are averaged over seeds. Invariants are asserted, not
assumed: the training rows hold exactly the budget, no hold-out scene is among them, and a frozen
backbone is bit-identical after a linear probe or k-NN.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from eossl.streaming.inputs import InputSpec
from eossl.streaming.zarr_dataset import ZarrPatchDataset
from eossl.train.checkpoint import state_digest

from .grid import assert_scene_holdout, row_name, training_subset
from .metrics import mean_and_spread, multi_label_metrics, single_label_metrics
from .models import INITS, NotApplicable, build_eval_encoder
from .probes import ProbeConfig, extract_features, finetune, knn_scores, linear_probe
from .report import plot_confusion, write_tables
from .tracking import eval_experiment

__all__ = ["ClassifyConfig", "run_classification"]

PROTOCOLS = ("linear", "finetune", "knn")


@dataclass(frozen=True)
class ClassifyConfig:
    """An evaluation grid.

    Attributes:
        dataset: dataset folder or URL (with data.zarr and subsets.json).
        out: folder for results.csv/.md, per-cell metrics and figures (and the local MLflow store).
        checkpoints: pre-training run folders to evaluate.
        inputs: columns of the table (s1, s2, s1s2).
        s2_bands: S2 bands of the inputs ('land' = the 10 benchmark bands, 'all' = 13).
        budget: training labels per cell: a budget written by ingest (e.g. 1024) or 'all' (the train split).
        protocol: linear (frozen features), finetune (all layers) or knn (frozen features).
        seeds: one budget subset and classifier initialisation per seed.
        label: 'igbp_simple' (10 classes) or 'igbp' (17).
        multilabel: multi-label targets (classes above the ingest threshold) instead of the majority class.
        inits: rows: 'random' and/or checkpoint inits (see eval.models.INITS).
        random_backbone: timm model for the random init (default: the first checkpoint's backbone).
        metric: headline metric of the table (default: overall_accuracy; mAP for multi-label).
        probe: classifier training settings.
        precision: 'no' or 'bf16' (autocast of feature extraction and fine-tuning, through accelerate).
        experiment: MLflow experiment.
    """

    dataset: str
    out: str
    checkpoints: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("s1", "s2", "s1s2")
    s2_bands: str = "land"
    budget: str = "1024"
    protocol: str = "linear"
    seeds: tuple[int, ...] = (0,)
    label: str = "igbp_simple"
    multilabel: bool = False
    inits: tuple[str, ...] = ("random", "checkpoint")
    random_backbone: str | None = None
    metric: str | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    precision: str = "no"
    experiment: str = "eossl-eval"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        bad = [i for i in self.inits if i not in INITS]
        if bad:
            raise ValueError(f"unknown init {bad}; choose from {INITS}")
        if any(i != "random" for i in self.inits) and not self.checkpoints:
            raise ValueError("checkpoint inits need at least one --checkpoint RUN_DIR")
        if self.precision not in ("no", "bf16"):
            raise ValueError(f"precision must be no or bf16, got {self.precision!r}")
        if self.budget != "all" and not str(self.budget).isdigit():
            raise ValueError(f"budget must be a number of labels or 'all', got {self.budget!r}")

    @property
    def headline(self) -> str:
        return self.metric or ("map" if self.multilabel else "overall_accuracy")


def _method_rows(cfg: ClassifyConfig) -> list[tuple[str, str, str | None]]:
    """(row name, init, run_dir) for every table row."""
    rows = []
    if "random" in cfg.inits:
        rows.append(("random init", "random", None))
    for run in cfg.checkpoints:
        for init in cfg.inits:
            if init != "random":
                rows.append((row_name(run, init), init, run))
    return rows


def _datasets(cfg: ClassifyConfig, spec: InputSpec, seed: int):
    subset = training_subset(cfg.budget, seed)
    train = ZarrPatchDataset(cfg.dataset, spec, rows=subset, label=cfg.label, multilabel=cfg.multilabel)
    test = ZarrPatchDataset(cfg.dataset, spec, rows="test", label=cfg.label, multilabel=cfg.multilabel)
    if cfg.budget != "all" and len(train) != int(cfg.budget):
        raise NotApplicable(f"budget subset {subset} has {len(train)} usable samples, not {cfg.budget} "
                            f"(excluded: {train.excluded})")
    assert_scene_holdout(train.keys, test.keys)
    return train, test


def _one_seed(cfg: ClassifyConfig, init: str, run_dir: str | None, spec: InputSpec, seed: int, backbone: str,
              acc: Accelerator) -> tuple[dict, np.ndarray | None, list[str]]:
    train, test = _datasets(cfg, spec, seed)
    torch.manual_seed(seed)
    model = build_eval_encoder(init, spec.channel_names, train.mean, train.std, run_dir, backbone)
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
    return metrics, confusion, list(train.classes)


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}


def run_classification(cfg: ClassifyConfig, command: tuple[str, ...] = (), parent_run_id: str | None = None,
                       tags: dict[str, str] | None = None) -> dict:
    """Run the grid; write tables, per-cell metrics and figures; log to MLflow (parent + one child per cell).

    ``parent_run_id`` nests the grid's run under another (a study cell); ``tags`` are set on it.
    """
    import mlflow

    out = Path(cfg.out)
    exp_id = eval_experiment(out, cfg.experiment)
    # accelerate picks the device (GPU when present) and runs autocast at the chosen precision, as in training.
    acc = Accelerator(mixed_precision=cfg.precision)
    backbone = cfg.random_backbone
    if backbone is None:
        backbone = "resnet50"
        for run in cfg.checkpoints:
            card = Path(run) / "backbone" / "model_card.json"
            if card.exists():
                backbone = json.loads(card.read_text())["timm_model"]
                break
    title = (f"SEN12MS scene classification, {cfg.label} {'multi' if cfg.multilabel else 'single'}-label, "
             f"{cfg.protocol}, {cfg.budget} labels, metric {cfg.headline}")
    cells: list[dict] = []
    with mlflow.start_run(experiment_id=exp_id, run_name=f"classify-{cfg.protocol}-{cfg.budget}",
                          parent_run_id=parent_run_id) as parent:
        mlflow.log_params({k: str(v) for k, v in asdict(cfg).items() if k != "probe"})
        mlflow.log_params({f"probe.{k}": v for k, v in asdict(cfg.probe).items()})
        mlflow.set_tags({"eossl.eval.parent": "1", "command": " ".join(command), **(tags or {})})
        for method, init, run_dir in _method_rows(cfg):
            for column in cfg.inputs:
                spec = InputSpec.parse(column, cfg.s2_bands)
                cell = {"method": method, "input": column, "metric": cfg.headline, "init": init,
                        "checkpoint": run_dir, "note": ""}
                folder = out / "cells" / f"{method.replace(' ', '_').replace('/', '_')}__{column}"
                t0 = time.perf_counter()
                with mlflow.start_run(experiment_id=exp_id, run_name=f"{method} / {column}", nested=True):
                    mlflow.set_tags({"eossl.eval.cell": "1", "eossl.eval.method": method, "eossl.eval.input": column,
                                     "eossl.eval.metric": cfg.headline})
                    mlflow.log_params({"method": method, "input": column, "init": init, "protocol": cfg.protocol,
                                       "budget": cfg.budget, "checkpoint": run_dir or "", "label": cfg.label,
                                       "multilabel": cfg.multilabel, "channels": ",".join(spec.channel_names)})
                    try:
                        per_seed = [_one_seed(cfg, init, run_dir, spec, s, backbone, acc) for s in cfg.seeds]
                    except NotApplicable as exc:
                        cell.update(mean=None, std=None, n=0, note=str(exc))
                        mlflow.set_tag("eossl.eval.note", str(exc)[:5000])
                        cells.append(cell)
                        continue
                    summary = {}
                    for name in _scalar_metrics(per_seed[0][0]):
                        stats = mean_and_spread([m[name] for m, _, _ in per_seed])
                        summary[f"{name}_mean"], summary[f"{name}_std"] = stats["mean"], stats["std"]
                    summary["seeds"] = len(per_seed)
                    mlflow.log_metrics(summary)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "metrics.json").write_text(json.dumps(
                        {"cell": cell, "summary": summary, "per_seed": [m for m, _, _ in per_seed]}, indent=1))
                    mlflow.log_artifact(str(folder / "metrics.json"))
                    if per_seed[0][1] is not None:
                        confusion = sum(c for _, c, _ in per_seed)
                        png = plot_confusion(confusion, per_seed[0][2], folder / "confusion.png",
                                             f"{method} / {column}: {cfg.protocol}, {cfg.budget} labels, "
                                             f"{len(per_seed)} seed(s) summed")
                        mlflow.log_artifact(str(png))
                    cell.update(mean=summary[f"{cfg.headline}_mean"], std=summary[f"{cfg.headline}_std"],
                                n=len(per_seed), seconds=round(time.perf_counter() - t0, 1))
                    cells.append(cell)
        csv_path, md_path = write_tables(cells, out, title)
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))
        parent_id = parent.info.run_id
    return {"cells": cells, "results_csv": csv_path, "results_md": md_path, "mlflow_parent_run_id": parent_id}
