"""Results tables (CSV + Markdown in the study's shape) and confusion-matrix figures.

Rows are pre-training methods, columns the inputs ``s1``, ``s2``, ``s1s2`` that were run; a cell is the
mean over seeds of the headline metric, with the spread in the Markdown. ``eossl eval report`` rebuilds
the same table from MLflow runs, so results of many evaluation jobs can be gathered without retraining.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["INPUT_COLUMNS", "collect_from_mlflow", "plot_confusion", "write_tables"]

INPUT_COLUMNS = ("s1", "s2", "s1s2")
_HEADINGS = {"s1s2": "s1/s2"}


def _columns(cells: list[dict]) -> list[str]:
    """The input columns some cell was run for, in the canonical order: an input not run has no column."""
    run = {c["input"] for c in cells}
    return [col for col in INPUT_COLUMNS if col in run] or list(INPUT_COLUMNS)


def _fmt(mean: float | None, std: float | None, n: int | None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{100 * mean:.2f}"
    return text + (f" ± {100 * std:.2f}" if n and n > 1 and std is not None else "")


def write_tables(cells: list[dict], out: Path, title: str, sections: Sequence[str] = ()) -> tuple[Path, Path]:
    """``cells``: dicts with method, input, mean, std, n (metric values in [0, 1]); writes results.csv/.md.

    ``sections``: Markdown lines appended to results.md after the table and its notes (e.g. per-class scores).
    """
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by_key = {(c["method"], c["input"]): c for c in cells}
    columns = _columns(cells)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *columns])
        for m in methods:
            row = [m]
            for col in columns:
                c = by_key.get((m, col))
                row.append("" if c is None or c.get("mean") is None else f"{100 * c['mean']:.2f}")
            writer.writerow(row)
    headings = [_HEADINGS.get(col, col) for col in columns]
    md = [f"# {title}", "", "| method | " + " | ".join(headings) + " |", "|" + " --- |" * (len(columns) + 1)]
    for m in methods:
        vals = []
        for col in columns:
            c = by_key.get((m, col))
            vals.append("" if c is None else _fmt(c.get("mean"), c.get("std"), c.get("n")))
        md.append(f"| {m} | " + " | ".join(vals) + " |")
    notes = [c for c in cells if c.get("note")]
    if notes:
        md += ["", "Notes:"] + [f"- {c['method']} / {c['input']}: {c['note']}" for c in notes]
    md += ["", "Values in percent: mean ± sample standard deviation over seeds.", *sections]
    md_path = out / "results.md"
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def collect_from_mlflow(
    tracking_uri: str | None, parent_run_id: str | None, experiment: str | None
) -> list[dict]:
    """Evaluation cells logged by ``eossl eval classify`` (child runs tagged ``eossl.eval.cell``)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if parent_run_id:
        exp_ids = [client.get_run(parent_run_id).info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`eossl.eval.cell` = '1'"
    else:
        exp = client.get_experiment_by_name(experiment or "eossl-eval")
        if exp is None:
            raise ValueError(f"MLflow experiment {experiment!r} not found")
        exp_ids = [exp.experiment_id]
        query = "tags.`eossl.eval.cell` = '1'"
    runs = client.search_runs(exp_ids, filter_string=query, order_by=["attributes.start_time ASC"])
    cells = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        metric = tags.get("eossl.eval.metric", "overall_accuracy")
        cells.append(
            {
                "method": tags["eossl.eval.method"],
                "input": tags["eossl.eval.input"],
                "mean": metrics.get(f"{metric}_mean"),
                "std": metrics.get(f"{metric}_std"),
                "n": int(metrics.get("seeds", 1)),
                "note": tags.get("eossl.eval.note", ""),
                "metric": metric,
                "run_id": run.info.run_id,
                "params": json.loads(json.dumps(run.data.params)),
            }
        )
    return cells
