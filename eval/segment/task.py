"""``eossl eval segment``: per-pixel land-cover segmentation from pre-trained backbones, as a results grid.

The downstream task of the DINO study: pre-train on unlabelled imagery, then train a segmentation head
on a few labelled patches and score land-cover maps on hold-out scenes, against the same model trained
from a random initialisation. The grid is scene classification's (``grid.run_grid``): rows are
methods (random init per architecture, pre-training runs), columns inputs (s1, s2, s1s2), cells the mean
over seeds of the hold-out mIoU. Protocols: ``linear`` (frozen backbone, linear head on the last feature
map) and ``finetune`` (a light decoder, backbone trained too; ``frozen=True`` keeps it fixed).

Asserted, not assumed: the training rows hold exactly the budget, no hold-out scene is among them, and a
frozen backbone is bit-identical after training and prediction. For ViT checkpoints, the unsupervised
maps of ``eossl attention`` (token k-means and thresholded attention, Hungarian-matched to the simplified
IGBP map) are scored on the same hold-out patches and reported as extra rows, so a reader sees what the
maps give without any label (``unsupervised``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from eossl.streaming.inputs import InputSpec
from eossl.train.checkpoint import state_digest
from eossl.train.export import read_model_card

from ..config import SegmentConfig
from ..grid import (
    CellOutcome,
    ExtraCell,
    GridRow,
    GridTask,
    assert_scene_holdout,
    row_name,
    run_grid,
    training_subset,
)
from ..metrics import mean_and_spread
from ..models import NotApplicable, build_eval_encoder
from .data import IGNORE_INDEX, SegmentationPatches, class_weights, label_scheme, patch_georef
from .figures import plot_predictions, write_map_geotiff, write_scene_mosaics
from .heads import build_segmenter
from .metrics import pixel_confusion, segmentation_scores
from .train import predict, train_segmenter
from .unsupervised import unsupervised_cells

__all__ = ["SegmentConfig", "SegmentTask", "run_segmentation"]


def _datasets(
    cfg: SegmentConfig, spec: InputSpec, seed: int
) -> tuple[SegmentationPatches, SegmentationPatches]:
    scheme = label_scheme(cfg.label)
    subset = training_subset(cfg.budget, seed)
    train = SegmentationPatches(cfg.dataset, spec, subset, scheme)
    test = SegmentationPatches(cfg.dataset, spec, "test", scheme)
    if cfg.budget != "all" and len(train) != int(cfg.budget):
        raise NotApplicable(
            f"budget subset {subset} has {len(train)} patches with land cover and {spec.sensors}, "
            f"not {cfg.budget} (excluded: {train.excluded})"
        )
    if not len(test):
        raise NotApplicable(
            f"no hold-out patch has land cover and {spec.sensors} (excluded: {test.excluded})"
        )
    assert_scene_holdout(train.keys, test.keys)
    return train, test


def _one_seed(
    cfg: SegmentConfig, row: GridRow, spec: InputSpec, seed: int, folder: Path, first: bool, acc: Accelerator
) -> dict:
    """Train one cell's model on one budget subset; score it on the hold-out patches; draw and write maps."""
    name, init, run_dir, arch = row.name, row.init, row.run_dir, row.backbone
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
    georef = (
        dict(zip(test.keys, patch_georef(cfg.dataset, test.rows), strict=True))
        if cfg.write_maps and first
        else {}
    )
    for item, pred in predict(model, test, cfg.train.batch_size, acc, cfg.train.workers):
        ref = item["y"].numpy()
        if pred.shape != ref.shape:
            raise AssertionError(
                f"prediction {pred.shape} for {item['key']} is not the patch's shape {ref.shape}"
            )
        confusion += pixel_confusion(pred, ref, k, IGNORE_INDEX)
        if first and len(drawn["keys"]) < cfg.figures:
            for key, value in (
                ("rows", int(item["row"])),
                ("keys", item["key"]),
                ("preds", pred),
                ("refs", ref),
            ):
                drawn[key].append(value)
        if georef:
            write_map_geotiff(folder / "maps" / f"{item['key']}.tif", pred, scheme, *georef[item["key"]])
    if georef:
        write_scene_mosaics(folder / "maps")  # one VRT per scene over its patch maps
    if before is not None and state_digest(model.encoder) != before:
        raise AssertionError("the frozen backbone changed while training the head")
    metrics = segmentation_scores(confusion, scheme.classes)
    metrics.update(
        train_patches=len(train),
        test_patches=len(test),
        train_pixels=counts.tolist(),
        class_weights=weights.tolist(),
        final_loss=losses[-1] if losses else None,
        steps=len(losses),
        train_seconds=round(train_s, 1),
        seed=seed,
        backbone_unchanged=None if before is None else True,
    )
    if drawn["keys"]:
        mode = "frozen" if cfg.is_frozen else "fine-tuned"
        title = (
            f"{name} / {'+'.join(spec.sensors)}: {cfg.head} head, backbone {mode}, {cfg.budget} labelled "
            f"patches, seed {seed}; hold-out mIoU {100 * metrics['miou']:.1f} % over all {len(test)} "
            "hold-out patches"
        )
        metrics["figure"] = str(
            plot_predictions(
                folder / "predictions.png",
                cfg.dataset,
                drawn["rows"],
                drawn["keys"],
                drawn["preds"],
                drawn["refs"],
                scheme,
                spec.sensors,
                title,
            )
        )
    metrics["_confusion"] = confusion
    return metrics


def _cell_name(method: str, column: str) -> str:
    return f"{method.replace(' ', '_').replace('/', '_').replace('(', '').replace(')', '')}__{column}"


def _per_class_section(cells: list[dict], classes: tuple[str, ...]) -> list[str]:
    scored = [c for c in cells if c.get("per_class_iou")]
    if not scored:
        return []
    lines = [
        "",
        "## Per-class IoU and pixel accuracy (%, mean over seeds; '-' = class absent from both "
        "prediction and reference, excluded from the mIoU)",
        "",
        "| method / input | mIoU | pixel acc. | " + " | ".join(classes) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in classes) + " |",
    ]
    for c in scored:
        vals = ["-" if v is None else f"{100 * v:.1f}" for v in c["per_class_iou"]]
        lines.append(
            f"| {c['method']} / {c['input']} | {100 * c['mean']:.2f} | {100 * c['pixel_accuracy']:.2f} | "
            + " | ".join(vals)
            + " |"
        )
    return lines


class SegmentTask(GridTask):
    """Segmentation cells: a head per (row, input, seed), hold-out mIoU from the summed pixel confusion."""

    name = "segment"
    tags = {"eossl.eval.task": "segment"}
    cfg: SegmentConfig

    @property
    def metric(self) -> str:
        return "miou"

    def title(self) -> str:
        cfg = self.cfg
        mode = "frozen" if cfg.is_frozen else "fine-tuned"
        classes = len(label_scheme(cfg.label).classes)
        return (
            f"SEN12MS land-cover segmentation, {cfg.label} ({classes} classes), "
            f"{cfg.protocol} ({cfg.head} head, backbone {mode}), {cfg.budget} labelled patches, "
            "metric hold-out mIoU"
        )

    def rows(self) -> list[GridRow]:
        """A random init per architecture of the checkpoints, then the runs."""
        cfg = self.cfg
        archs = list(dict.fromkeys(read_model_card(r)["timm_model"] for r in cfg.checkpoints))
        rows = []
        if "random" in cfg.inits:
            rows += [
                GridRow("random init" if len(archs) == 1 else f"random init ({a})", "random", None, a)
                for a in archs
            ]
        for run in cfg.checkpoints:
            arch = read_model_card(run)["timm_model"]
            rows += [GridRow(row_name(run, init), init, run, arch) for init in cfg.inits if init != "random"]
        return rows

    def cell_folder(self, out: Path, row: GridRow, column: str) -> Path:
        return out / "cells" / _cell_name(row.name, column)

    def cell_fields(self, row: GridRow) -> dict:
        return {"backbone": row.backbone}

    def cell_params(self, row: GridRow, column: str, spec: InputSpec) -> dict:
        cfg = self.cfg
        params = super().cell_params(row, column, spec)
        return {**params, "head": cfg.head, "frozen": cfg.is_frozen, "backbone": row.backbone}

    def run_seed(
        self, row: GridRow, spec: InputSpec, seed: int, folder: Path, first: bool, acc: Accelerator
    ) -> dict:
        return _one_seed(self.cfg, row, spec, seed, folder, first, acc)

    def summarise(self, cell: dict, per_seed: list[dict], folder: Path, started: float) -> CellOutcome:
        if any(m["miou"] is None for m in per_seed):
            raise NotApplicable("no scored hold-out pixel (all ignored)")
        classes = label_scheme(self.cfg.label).classes
        summary = {}
        for key in ("miou", "pixel_accuracy"):
            stats = mean_and_spread([m[key] for m in per_seed])
            summary[f"{key}_mean"], summary[f"{key}_std"] = stats["mean"], stats["std"]
        per_class = []
        for c in range(len(classes)):
            vals = [m["per_class_iou"][c] for m in per_seed if m["per_class_iou"][c] is not None]
            per_class.append(float(np.mean(vals)) if vals else None)
            if vals:
                summary[f"iou_{c}_mean"] = per_class[-1]
        summary["seeds"] = len(per_seed)
        confusion = sum(m.pop("_confusion") for m in per_seed)
        folder.mkdir(parents=True, exist_ok=True)
        values = {
            "mean": summary["miou_mean"],
            "std": summary["miou_std"],
            "n": len(per_seed),
            "pixel_accuracy": summary["pixel_accuracy_mean"],
            "per_class_iou": per_class,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "cell": {**cell, **values},
                    "summary": summary,
                    "classes": list(classes),
                    "confusion_summed_over_seeds": confusion.tolist(),
                    "per_seed": per_seed,
                },
                indent=1,
            )
        )
        values["artifacts"] = [str(folder / "metrics.json")] + (
            [per_seed[0]["figure"]] if "figure" in per_seed[0] else []
        )
        metrics = {k: v for k, v in summary.items() if v is not None and not math.isnan(v)}
        return CellOutcome(values, metrics, values["artifacts"])

    def extra_cells(self, rows: list[GridRow], out: Path) -> list[ExtraCell]:
        """The unsupervised maps of each pre-trained ViT on the same hold-out patches (no label used)."""
        if self.cfg.attention_patches <= 0:
            return []
        return unsupervised_cells(self.cfg, rows, lambda row, column: self.cell_folder(out, row, column))

    def sections(self, cells: list[dict]) -> list[str]:
        cfg = self.cfg
        scheme = label_scheme(cfg.label)
        sections = _per_class_section(cells, scheme.classes)
        text = (
            "Supervised rows: dataset-level mIoU over the hold-out patches (IoU per class from the pixel "
            "confusion matrix summed over all hold-out patches; classes absent from both prediction and "
            "reference are left out)."
        )
        if any(c["init"] == "unsupervised" for c in cells):
            text += (
                " '(no labels)' rows: the DINO figure metrics (eossl attention): per patch, clusters or "
                "masks Hungarian-matched to the simplified IGBP classes present, mIoU over those classes, "
                "averaged "
                f"over up to {cfg.attention_patches} hold-out patches; per-patch matching makes them an "
                "optimistic reference, not comparable digit for digit."
            )
        sections += ["", text]
        return sections


def run_segmentation(
    cfg: SegmentConfig,
    command: tuple[str, ...] = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Run the grid; write tables, per-cell metrics, figures and maps; log to MLflow (parent + a run per
    cell).

    ``parent_run_id`` nests the grid's run under another (a study cell); ``tags`` are set on it.
    """
    return run_grid(SegmentTask(cfg), command, parent_run_id, tags)
