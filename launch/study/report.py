"""``eossl study report``: the study's table and plots, gathered from its MLflow runs.

Everything comes from MLflow (the parent run's children), not from the study folder, so a report can be
rebuilt on any machine that reaches the tracking server, and cells run as cluster jobs appear in it.

- ``results.csv`` / ``results.md``: one row per cell: grid values, effective batch size, scaled learning
  rate, steps, final loss, median throughput, and the headline downstream score per protocol and input.
- ``score_vs_<x>.png``: downstream score against ``plot.x`` (epochs), one line per ``plot.lines`` value
  (batch size), one panel per (protocol, input): the "batch size vs epochs" figure.
- ``loss_curves.png``: pre-training loss against epochs (not steps: cells with other batch sizes take
  other step counts per epoch), one line per cell.
- ``throughput_vs_batch.png``: median training samples/s against the effective batch size.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .config import PlotSpec

__all__ = ["collect_cells", "draw_loss_curves", "write_report"]


def _status(status: str, error: str) -> str:
    """The run's MLflow status, with the first line of its recorded error (shortened, table-safe)."""
    if not error:
        return status
    first = error.splitlines()[0].replace("|", "/")
    return f"{status}: {first[:117] + '...' if len(first) > 120 else first}"


def collect_cells(tracking_uri: str, parent_run_id: str) -> list[dict]:
    """Per finished or running cell: grid values, training params, eval scores and metric histories."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    cells = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        if "eossl.study.cell" not in tags or "eossl.study.eval" in tags:
            continue
        loss = client.get_metric_history(run.info.run_id, "loss")
        speed = client.get_metric_history(run.info.run_id, "samples_per_s")
        steps_per_epoch = float(params.get("steps_per_epoch", "nan"))
        cells.append(
            {
                "cell": tags["eossl.study.cell"],
                "run_id": run.info.run_id,
                # A failed training names its error (eossl.error): "FAILED: CheckpointError: ...".
                "status": _status(run.info.status, tags.get("eossl.error", "")),
                "values": json.loads(tags.get("eossl.study.values", "{}")),
                "effective_batch_size": _number(params.get("effective_batch_size")),
                "lr": _number(params.get("lr_scaled")),
                "lr_rule": params.get("optim.lr_scaling", ""),
                "steps": int(max((m.step for m in loss), default=0)),
                "final_loss": sorted(loss, key=lambda m: m.step)[-1].value if loss else math.nan,
                # The first logged window includes start-up (worker spawn, first batches): leave it out.
                "samples_per_s": float(
                    np.median([m.value for m in speed[1:]] or [m.value for m in speed] or [math.nan])
                ),
                "loss_curve": [
                    (m.step / steps_per_epoch, m.value) for m in sorted(loss, key=lambda m: m.step)
                ],
                "scores": {k: v for k, v in metrics.items() if k.startswith("eval")},
                "spread": {k.removeprefix("std."): v for k, v in metrics.items() if k.startswith("std.eval")},
            }
        )
    return sorted(cells, key=lambda c: [_sortable(v) for v in c["values"].values()])


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _score_columns(cells: list[dict]) -> list[str]:
    return sorted({k for c in cells for k in c["scores"]})


def write_tables(cells: list[dict], out: Path) -> tuple[Path, Path]:
    keys: list[str] = []
    for c in cells:
        keys += [k for k in c["values"] if k not in keys]
    scores = _score_columns(cells)
    header = [
        "cell",
        *keys,
        "effective_batch_size",
        "lr",
        "steps",
        "final_loss",
        "samples_per_s",
        *scores,
        "status",
    ]
    rows = []
    for c in cells:
        rows.append(
            [
                c["cell"],
                *[c["values"].get(k, "") for k in keys],
                _fmt(c["effective_batch_size"], 0),
                _fmt(c["lr"], 4),
                c["steps"],
                _fmt(c["final_loss"], 4),
                _fmt(c["samples_per_s"], 1),
                *[_fmt(100 * c["scores"][s], 2) if s in c["scores"] else "n/a" for s in scores],
                c["status"],
            ]
        )
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    lines = [
        "Scaling study: downstream scores in % (eval.<protocol>.<input>.<metric>)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(value: float, digits: int) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _sortable(value):
    return (0, float(value)) if isinstance(value, (int, float)) else (1, str(value))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_scores(cells: list[dict], plot: PlotSpec, path: Path) -> Path | None:
    plt = _pyplot()
    scores = _score_columns(cells)
    usable = [c for c in cells if plot.x in c["values"]]
    if not scores or not usable:
        return None
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.4), squeeze=False)
    lines = sorted({c["values"].get(plot.lines, "all") for c in usable}, key=_sortable)
    for ax, score in zip(axes[0], scores, strict=True):
        for line in lines:
            points = sorted(
                (
                    (c["values"][plot.x], 100 * c["scores"][score], 100 * c["spread"].get(score, 0.0))
                    for c in usable
                    if c["values"].get(plot.lines, "all") == line and score in c["scores"]
                ),
                key=lambda p: _sortable(p[0]),
            )
            if points:
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] for p in points],
                    marker="o",
                    capsize=3,
                    label=f"{plot.lines}={line}",
                )
        ax.set_title(score.removeprefix("eval."), fontsize=9)
        ax.set_xlabel(plot.x)
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "downstream score vs pre-training length (error bars: std over evaluation seeds)", fontsize=10
    )
    return _save(fig, path)


_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def draw_loss_curves(ax, cells: list[dict]) -> list:
    """One line per cell with a loss curve; returns the lines (in drawing order).

    Cells of a study often share a prefix (a 2-epoch run is the start of a 4-epoch one with the same batch),
    so their curves lie on top of each other. Longer runs are drawn first and shorter ones over them, and
    every line has its own dash pattern and marker, so each curve stays visible where they coincide.
    """
    curves = sorted((c for c in cells if c["loss_curve"]), key=lambda c: -len(c["loss_curve"]))
    lines = []
    for i, c in enumerate(curves):
        xs, ys = [p[0] for p in c["loss_curve"]], [p[1] for p in c["loss_curve"]]
        every = max(len(xs) // 8, 1)
        (line,) = ax.plot(
            xs,
            ys,
            label=c["cell"],
            lw=1.4,
            linestyle=_LINE_STYLES[i % len(_LINE_STYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markevery=(i % every, every),  # markers of coinciding curves at different points
            markersize=4,
            zorder=2 + i,
        )
        lines.append(line)
    return lines


def plot_loss_curves(cells: list[dict], path: Path) -> Path | None:
    plt = _pyplot()
    if not any(c["loss_curve"] for c in cells):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    draw_loss_curves(ax, cells)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_throughput(cells: list[dict], path: Path) -> Path | None:
    plt = _pyplot()
    points = sorted(
        (c["effective_batch_size"], c["samples_per_s"])
        for c in cells
        if not math.isnan(c["samples_per_s"]) and not math.isnan(c["effective_batch_size"])
    )
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective batch size")
    ax.set_ylabel("training samples/s (median)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_report(
    tracking_uri: str,
    parent_run_id: str,
    out: Path,
    plot: PlotSpec,
    log_to_parent: bool = True,
    require_cells: bool = True,
) -> dict:
    """Tables and plots of the study under ``parent_run_id`` into ``out`` (and the parent run's artifacts)."""
    import mlflow

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = collect_cells(tracking_uri, parent_run_id)
    if not cells and require_cells:
        raise ValueError(f"no study cells under MLflow run {parent_run_id} at {tracking_uri}")
    csv_path, md_path = write_tables(cells, out)
    figures = [
        p
        for p in (
            plot_scores(cells, plot, out / f"score_vs_{plot.x.rsplit('.', 1)[-1]}.png"),
            plot_loss_curves(cells, out / "loss_curves.png"),
            plot_throughput(cells, out / "throughput_vs_batch.png"),
        )
        if p is not None
    ]
    if log_to_parent:
        client = mlflow.MlflowClient(tracking_uri)
        for path in (csv_path, md_path, *figures):
            client.log_artifact(parent_run_id, str(path), artifact_path="report")
    return {"results_csv": csv_path, "results_md": md_path, "figures": figures, "cells": cells}
