"""``eossl eval segment``: per-pixel land-cover segmentation from pre-trained backbones, as a results grid.

The downstream task of the DINO study: pre-train on unlabelled imagery, then train a segmentation head
on a few labelled patches and score land-cover maps on hold-out scenes, against the same model trained
from a random initialisation. The grid is shaped like scene classification (``classify.py``): rows are
methods (random init per architecture, pre-training runs), columns inputs (s1, s2, s1s2), cells the mean
over seeds of the hold-out mIoU. Protocols: ``linear`` (frozen backbone, linear head on the last feature
map) and ``finetune`` (a light decoder, backbone trained too; ``frozen=True`` keeps it fixed).

Asserted, not assumed: the training rows hold exactly the budget, no hold-out scene is among them, and a
frozen backbone is bit-identical after training and prediction. For ViT checkpoints, the unsupervised
maps of ``attention.py`` (token k-means and thresholded attention, Hungarian-matched to the simplified
IGBP map) are scored on the same hold-out patches and reported as extra rows, so a reader sees what the
maps give without any label.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from eossl.streaming.inputs import InputSpec
from eossl.train.checkpoint import state_digest
from eossl.train.vit import is_vit

from .grid import assert_scene_holdout, row_name, training_subset
from .metrics import mean_and_spread
from .models import INITS, NotApplicable, build_eval_encoder
from .report import write_tables
from .seg_data import IGNORE_INDEX, SegmentationPatches, class_weights, label_scheme, patch_georef
from .seg_figures import plot_predictions, write_map_geotiff
from .seg_heads import build_segmenter
from .seg_train import SegTrainConfig, predict, train_segmenter
from .segmentation_metrics import pixel_confusion, segmentation_scores
from .tracking import eval_experiment

__all__ = ["SegmentConfig", "run_segmentation"]

PROTOCOLS = ("linear", "finetune")


@dataclass(frozen=True)
class SegmentConfig:
    """A segmentation grid.

    Attributes:
        dataset: dataset folder or URL (with data.zarr and subsets.json).
        out: folder for results.csv/.md, per-cell metrics, figures, maps (and the local MLflow store).
        checkpoints: pre-training run folders (DINO ViT, MoCo ResNet, ...).
        inputs: columns of the table (s1, s2, s1s2).
        s2_bands: S2 bands of the inputs ('land' = the 10 benchmark bands).
        budget: labelled training patches per cell: a budget written by ingest, or 'all' (the train split).
        protocol: 'linear' (linear head, backbone frozen) or 'finetune' (decoder, backbone trained).
        frozen: override whether the backbone is frozen (None: frozen for linear, trained for finetune).
        seeds: one budget subset and head initialisation per seed.
        label: per-pixel classes: igbp_simple (10), igbp (17), lccs_lc, lccs_lu, lccs_sh (seg_data.SEG_LABELS).
        inits: rows: 'random' and/or checkpoint inits (eval.models.INITS).
        train: optimisation of a cell.
        precision: 'no' or 'bf16' (autocast, through accelerate).
        figures: hold-out patches drawn per cell (first seed); 0 draws none.
        write_maps: write every hold-out prediction of the first seed as a GeoTIFF (cells/<cell>/maps/).
        attention_patches: hold-out patches scored with the unsupervised ViT maps (0: skip those rows).
        experiment: MLflow experiment.
    """

    dataset: str
    out: str
    checkpoints: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("s1", "s2", "s1s2")
    s2_bands: str = "land"
    budget: str = "32"
    protocol: str = "linear"
    frozen: bool | None = None
    seeds: tuple[int, ...] = (0,)
    label: str = "igbp_simple"
    inits: tuple[str, ...] = ("random", "checkpoint")
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    precision: str = "no"
    figures: int = 3
    write_maps: bool = False
    attention_patches: int = 64
    experiment: str = "eossl-eval"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        bad = [i for i in self.inits if i not in INITS]
        if bad:
            raise ValueError(f"unknown init {bad}; choose from {INITS}")
        if not self.checkpoints:
            raise ValueError("segmentation needs at least one --checkpoint RUN_DIR (it also fixes the architecture "
                             "of the random init)")
        if self.precision not in ("no", "bf16"):
            raise ValueError(f"precision must be no or bf16, got {self.precision!r}")
        if self.budget != "all" and not str(self.budget).isdigit():
            raise ValueError(f"budget must be a number of labels or 'all', got {self.budget!r}")
        label_scheme(self.label)

    @property
    def is_frozen(self) -> bool:
        return self.protocol == "linear" if self.frozen is None else self.frozen

    @property
    def head(self) -> str:
        return "linear" if self.protocol == "linear" else "decoder"


def _card(run_dir: str) -> dict:
    path = Path(run_dir) / "backbone" / "model_card.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished eossl pre-training run")
    return json.loads(path.read_text())


def _method_rows(cfg: SegmentConfig) -> list[tuple[str, str, str | None, str]]:
    """(row name, init, run_dir, timm model): a random init per architecture of the checkpoints, then the runs."""
    archs = list(dict.fromkeys(_card(r)["timm_model"] for r in cfg.checkpoints))
    rows = []
    if "random" in cfg.inits:
        rows += [("random init" if len(archs) == 1 else f"random init ({a})", "random", None, a) for a in archs]
    for run in cfg.checkpoints:
        for init in cfg.inits:
            if init != "random":
                rows.append((row_name(run, init), init, run, _card(run)["timm_model"]))
    return rows


def _datasets(cfg: SegmentConfig, spec: InputSpec, seed: int) -> tuple[SegmentationPatches, SegmentationPatches]:
    scheme = label_scheme(cfg.label)
    subset = training_subset(cfg.budget, seed)
    train = SegmentationPatches(cfg.dataset, spec, subset, scheme)
    test = SegmentationPatches(cfg.dataset, spec, "test", scheme)
    if cfg.budget != "all" and len(train) != int(cfg.budget):
        raise NotApplicable(f"budget subset {subset} has {len(train)} patches with land cover and {spec.sensors}, "
                            f"not {cfg.budget} (excluded: {train.excluded})")
    if not len(test):
        raise NotApplicable(f"no hold-out patch has land cover and {spec.sensors} (excluded: {test.excluded})")
    assert_scene_holdout(train.keys, test.keys)
    return train, test


def _one_seed(cfg: SegmentConfig, row: tuple, spec: InputSpec, seed: int, folder: Path, first: bool,
              acc: Accelerator) -> dict:
    """Train one cell's model on one budget subset; score it on the hold-out patches; draw and write maps."""
    name, init, run_dir, arch = row
    train, test = _datasets(cfg, spec, seed)
    scheme = label_scheme(cfg.label)
    ev = build_eval_encoder(init, spec.channel_names, train.mean, train.std, run_dir, arch)
    model = build_segmenter(ev, len(scheme.classes), cfg.head, cfg.is_frozen, cfg.train.decoder_width)
    counts = train.pixel_counts()
    weights = class_weights(counts, cfg.train.class_weighting)
    tcfg = cfg.train if init != "random" else replace(cfg.train, backbone_lr_scale=1.0)
    before = state_digest(model.encoder) if cfg.is_frozen else None
    t0 = time.perf_counter()
    losses = train_segmenter(model, train, weights, tcfg, seed, acc)
    train_s = time.perf_counter() - t0
    k = len(scheme.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    drawn: dict[str, list] = {"rows": [], "keys": [], "preds": [], "refs": []}
    georef = dict(zip(test.keys, patch_georef(cfg.dataset, test.rows), strict=True)) if cfg.write_maps and first else {}
    for item, pred in predict(model, test, cfg.train.batch_size, acc, cfg.train.workers):
        ref = item["y"].numpy()
        if pred.shape != ref.shape:
            raise AssertionError(f"prediction {pred.shape} for {item['key']} is not the patch's shape {ref.shape}")
        confusion += pixel_confusion(pred, ref, k, IGNORE_INDEX)
        if first and len(drawn["keys"]) < cfg.figures:
            for key, value in (("rows", int(item["row"])), ("keys", item["key"]), ("preds", pred), ("refs", ref)):
                drawn[key].append(value)
        if georef:
            write_map_geotiff(folder / "maps" / f"{item['key']}.tif", pred, scheme, *georef[item["key"]])
    if before is not None and state_digest(model.encoder) != before:
        raise AssertionError("the frozen backbone changed while training the head")
    metrics = segmentation_scores(confusion, scheme.classes)
    metrics.update(train_patches=len(train), test_patches=len(test), train_pixels=counts.tolist(),
                   class_weights=weights.tolist(), final_loss=losses[-1] if losses else None,
                   steps=len(losses), train_seconds=round(train_s, 1), seed=seed,
                   backbone_unchanged=None if before is None else True)
    if drawn["keys"]:
        mode = "frozen" if cfg.is_frozen else "fine-tuned"
        title = (f"{name} / {'+'.join(spec.sensors)}: {cfg.head} head, backbone {mode}, {cfg.budget} labelled patches, "
                 f"seed {seed}; hold-out mIoU {metrics['miou']:.2f} over all {len(test)} hold-out patches")
        metrics["figure"] = str(plot_predictions(folder / "predictions.png", cfg.dataset, drawn["rows"], drawn["keys"],
                                                 drawn["preds"], drawn["refs"], scheme, spec.sensors, title))
    metrics["_confusion"] = confusion
    return metrics


def _has_tokens(run_dir: str) -> bool:
    """Whether a run's backbone is a ViT (attention maps and patch tokens), from the weights as loaded."""
    channels = _card(run_dir)["inputs"]["view0"]["channels"]
    ev = build_eval_encoder("checkpoint", channels, np.zeros(len(channels)), np.ones(len(channels)), run_dir)
    return is_vit(ev.encoder.backbone)


def _unsupervised(cfg: SegmentConfig, run_dir: str, column: str, folder: Path) -> dict:
    """Means of the attention.py agreement scores over the first hold-out patches of a ViT run."""
    from .attention import attention_figures

    spec = InputSpec.parse(column, cfg.s2_bands)
    test = SegmentationPatches(cfg.dataset, spec, "test", label_scheme("igbp_simple"))
    keys = [str(k) for k in test.keys[: cfg.attention_patches]]
    if not keys:
        raise NotApplicable("no hold-out patch with land cover")
    build_eval_encoder("checkpoint", spec.channel_names, test.mean, test.std, run_dir)  # NotApplicable: no layout
    res = attention_figures(run_dir, cfg.dataset, keys, str(folder / "attention"), inputs=column, draw=False)
    return res["summary"]


UNSUPERVISED_ROWS = (("kmeans_miou", "token k-means"), ("attention_best_head_miou", "attention mask, best head"),
                     ("kmeans_input_baseline_miou", "input k-means baseline"))


def _cell_name(method: str, column: str) -> str:
    return f"{method.replace(' ', '_').replace('/', '_').replace('(', '').replace(')', '')}__{column}"


def _per_class_section(cells: list[dict], classes: tuple[str, ...]) -> list[str]:
    scored = [c for c in cells if c.get("per_class_iou")]
    if not scored:
        return []
    lines = ["", "## Per-class IoU and pixel accuracy (%, mean over seeds; '-' = class absent from both "
             "prediction and reference, excluded from the mIoU)", "",
             "| method / input | mIoU | pixel acc. | " + " | ".join(classes) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in classes) + " |"]
    for c in scored:
        vals = ["-" if v is None else f"{100 * v:.1f}" for v in c["per_class_iou"]]
        lines.append(f"| {c['method']} / {c['input']} | {100 * c['mean']:.2f} | {100 * c['pixel_accuracy']:.2f} | "
                     + " | ".join(vals) + " |")
    return lines


def run_segmentation(cfg: SegmentConfig, command: tuple[str, ...] = (), parent_run_id: str | None = None,
                     tags: dict[str, str] | None = None) -> dict:
    """Run the grid; write tables, per-cell metrics, figures and maps; log to MLflow (parent + one child per cell).

    ``parent_run_id`` nests the grid's run under another (a study cell); ``tags`` are set on it.
    """
    import mlflow

    out = Path(cfg.out)
    exp_id = eval_experiment(out, cfg.experiment)
    acc = Accelerator(mixed_precision=cfg.precision)
    scheme = label_scheme(cfg.label)
    mode = "frozen" if cfg.is_frozen else "fine-tuned"
    title = (f"SEN12MS land-cover segmentation, {cfg.label} ({len(scheme.classes)} classes), {cfg.protocol} "
             f"({cfg.head} head, backbone {mode}), {cfg.budget} labelled patches, metric hold-out mIoU")
    rows = _method_rows(cfg)
    cells: list[dict] = []

    def log_cell(cell: dict, summary: dict, params: dict) -> None:
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{cell['method']} / {cell['input']}", nested=True):
            mlflow.set_tags({"eossl.eval.cell": "1", "eossl.eval.method": cell["method"],
                             "eossl.eval.input": cell["input"], "eossl.eval.metric": "miou",
                             "eossl.eval.task": "segment"})
            mlflow.log_params(params)
            if cell.get("note"):
                mlflow.set_tag("eossl.eval.note", cell["note"][:5000])
            if summary:
                mlflow.log_metrics(summary)
            for path in cell.get("artifacts", []):
                mlflow.log_artifact(path)

    with mlflow.start_run(experiment_id=exp_id, run_name=f"segment-{cfg.protocol}-{cfg.budget}",
                          parent_run_id=parent_run_id) as parent:
        mlflow.log_params({k: str(v) for k, v in asdict(cfg).items() if k != "train"})
        mlflow.log_params({f"train.{k}": v for k, v in asdict(cfg.train).items()})
        mlflow.set_tags({"eossl.eval.parent": "1", "eossl.eval.task": "segment", "command": " ".join(command),
                         **(tags or {})})
        for row in rows:
            method, init, run_dir, arch = row
            for column in cfg.inputs:
                spec = InputSpec.parse(column, cfg.s2_bands)
                folder = out / "cells" / _cell_name(method, column)
                cell = {"method": method, "input": column, "metric": "miou", "init": init, "checkpoint": run_dir,
                        "backbone": arch, "note": ""}
                params = {"method": method, "input": column, "init": init, "protocol": cfg.protocol,
                          "head": cfg.head, "frozen": cfg.is_frozen, "budget": cfg.budget, "label": cfg.label,
                          "checkpoint": run_dir or "", "backbone": arch, "channels": ",".join(spec.channel_names)}
                t0 = time.perf_counter()
                try:
                    per_seed = [_one_seed(cfg, row, spec, s, folder, i == 0, acc) for i, s in enumerate(cfg.seeds)]
                except NotApplicable as exc:
                    cell.update(mean=None, std=None, n=0, note=str(exc))
                    cells.append(cell)
                    log_cell(cell, {}, params)
                    continue
                summary = {}
                if any(m["miou"] is None for m in per_seed):
                    cell.update(mean=None, std=None, n=0, note="no scored hold-out pixel (all ignored)")
                    cells.append(cell)
                    log_cell(cell, {}, params)
                    continue
                for key in ("miou", "pixel_accuracy"):
                    stats = mean_and_spread([m[key] for m in per_seed])
                    summary[f"{key}_mean"], summary[f"{key}_std"] = stats["mean"], stats["std"]
                per_class = []
                for c in range(len(scheme.classes)):
                    vals = [m["per_class_iou"][c] for m in per_seed if m["per_class_iou"][c] is not None]
                    per_class.append(float(np.mean(vals)) if vals else None)
                    if vals:
                        summary[f"iou_{c}_mean"] = per_class[-1]
                summary["seeds"] = len(per_seed)
                confusion = sum(m.pop("_confusion") for m in per_seed)
                folder.mkdir(parents=True, exist_ok=True)
                cell.update(mean=summary["miou_mean"], std=summary["miou_std"], n=len(per_seed),
                            pixel_accuracy=summary["pixel_accuracy_mean"], per_class_iou=per_class,
                            seconds=round(time.perf_counter() - t0, 1))
                (folder / "metrics.json").write_text(json.dumps(
                    {"cell": cell, "summary": summary, "classes": list(scheme.classes),
                     "confusion_summed_over_seeds": confusion.tolist(), "per_seed": per_seed}, indent=1))
                cell["artifacts"] = [str(folder / "metrics.json")] + ([per_seed[0]["figure"]]
                                                                      if "figure" in per_seed[0] else [])
                log_cell(cell, {k: v for k, v in summary.items() if v is not None and not math.isnan(v)}, params)
                cells.append(cell)
        # The unsupervised maps of each pre-trained ViT on the same hold-out patches (no label used).
        if cfg.attention_patches > 0:
            for row in rows:
                method, init, run_dir, arch = row
                if init != "checkpoint":
                    continue
                tokens = _has_tokens(run_dir)
                for column in cfg.inputs:
                    folder = out / "cells" / _cell_name(method, column)
                    summary, note = None, f"n/a: {arch} has no attention maps or patch tokens"
                    if tokens:
                        try:
                            summary, note = _unsupervised(cfg, run_dir, column, folder), ""
                        except NotApplicable as exc:
                            note = str(exc)
                    for key, label in UNSUPERVISED_ROWS:
                        if not tokens and key == "kmeans_input_baseline_miou":  # the ViT token grid's baseline
                            continue
                        value = summary.get(key) if summary else None
                        cell = {"method": f"{method}: {label} (no labels)", "input": column, "metric": "miou",
                                "init": "unsupervised", "checkpoint": run_dir, "backbone": arch, "mean": value,
                                "std": None, "n": summary["patches_with_lc"] if summary else 0, "note": note}
                        log_cell(cell, {"miou_mean": value, "seeds": 1} if value is not None else {},
                                 {"method": cell["method"], "input": column, "checkpoint": run_dir or "",
                                  "patches": cell["n"]})
                        cells.append(cell)
        sections = _per_class_section(cells, scheme.classes)
        text = ("Supervised rows: dataset-level mIoU over the hold-out patches (IoU per class from the pixel "
                "confusion matrix summed over all hold-out patches; classes absent from both prediction and "
                "reference are left out).")
        if any(c["init"] == "unsupervised" for c in cells):
            text += (" '(no labels)' rows: the DINO figure metrics (eval/attention.py): per patch, clusters or masks "
                     "Hungarian-matched to the simplified IGBP classes present, mIoU over those classes, averaged "
                     f"over up to {cfg.attention_patches} hold-out patches; per-patch matching makes them an "
                     "optimistic reference, not comparable digit for digit.")
        sections += ["", text]
        csv_path, md_path = write_tables(cells, out, title, sections)
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))
        parent_id = parent.info.run_id
    return {"cells": cells, "results_csv": csv_path, "results_md": md_path, "mlflow_parent_run_id": parent_id}
