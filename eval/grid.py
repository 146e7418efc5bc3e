"""One evaluation grid runner for every task: rows are methods, columns inputs, a cell the mean over seeds.

A task (scene classification, land-cover segmentation, ...) is a ``GridTask``: its table rows, its
per-seed cell and how seeds are summed up into a cell. The runner owns what every grid does the same way:
the accelerator, the MLflow experiment, a parent run with the config as params and one child run per cell
(tags ``eossl.eval.cell``, ``.method``, ``.input``, ``.metric``, which ``eossl eval report`` reads back),
a cell that cannot be evaluated becoming a note in the table instead of an error, and results.csv/.md and
cells.json at the end. Also here: what the grids share about data (budget subsets, the scene hold-out,
row names).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eossl.ingest.integrity import read_manifest
from eossl.ingest.storage import DatasetRoot
from eossl.streaming.inputs import InputSpec
from eossl.train.progress import Countdown, log_line
from eossl.train.tracking import log_dataset_input

from .checkpoints import export_checkpoint
from .config import GridConfig
from .models import NotApplicable
from .preflight import check_grid_inputs
from .report import write_tables
from .tracking import eval_experiment, pretrain_tags

__all__ = [
    "CellOutcome",
    "ExtraCell",
    "GridRow",
    "GridTask",
    "assert_scene_holdout",
    "row_name",
    "run_grid",
    "training_subset",
]


def training_subset(budget: str, seed: int) -> str:
    """The rows a cell trains on: ingest's ``budget_<B>_seed<S>`` subset, or the whole training split."""
    return "train" if budget == "all" else f"budget_{budget}_seed{seed}"


def _scenes(keys: Iterable[str]) -> set[str]:
    return {
        str(k).rsplit("_p", 1)[0] for k in keys
    }  # ROIs1158_spring_1_p30 -> ROIs1158_spring_1 (PatchId.scene_id)


def assert_scene_holdout(train_keys: Iterable[str], test_keys: Iterable[str]) -> None:
    """Never expected (ingest splits by scene): guards against a mixed-up dataset."""
    leaked = _scenes(train_keys) & _scenes(test_keys)
    if leaked:
        raise AssertionError(f"hold-out scenes in the training rows: {sorted(leaked)[:5]}")


def row_name(run_dir: str, init: str) -> str:
    """A table row of a pre-training run: its folder name, with the init when it is not the plain
    checkpoint."""
    name = Path(run_dir).resolve().name
    return name if init == "checkpoint" else f"{name} ({init.removeprefix('checkpoint-')})"


@dataclass(frozen=True)
class GridRow:
    """A table row: its name, the init, the pre-training run (None for random) and the timm model."""

    name: str
    init: str
    run_dir: str | None
    backbone: str


@dataclass
class CellOutcome:
    """What a task makes of one cell's seeds.

    Attributes:
        values: merged into the cell's record (mean, std, n and the task's extra columns).
        metrics: logged to the cell's MLflow run.
        artifacts: files logged to the cell's MLflow run.
    """

    values: dict[str, Any]
    metrics: dict[str, float]
    artifacts: list[str] = field(default_factory=list)


@dataclass
class ExtraCell:
    """A table cell that is not one (row, input, seeds) training, e.g. a score computed without labels."""

    cell: dict[str, Any]
    metrics: dict[str, float]
    params: dict[str, Any]


class GridTask:
    """What a task gives the runner. Subclass it, set ``name``, ``metric`` and ``tags``, and fill the methods.

    Attributes:
        cfg: the grid's config (a ``GridConfig`` subclass).
        name: the parent run's name prefix (``<name>-<protocol>-<budget>``).
        tags: set on the parent and every cell run, besides the cell tags.
    """

    name = "grid"
    tags: dict[str, str] = {}

    def __init__(self, cfg: GridConfig) -> None:
        self.cfg = cfg

    @property
    def metric(self) -> str:
        """The headline metric: a cell's mean, the table's values, the ``eossl.eval.metric`` tag."""
        raise NotImplementedError

    def title(self) -> str:
        """The table's heading."""
        raise NotImplementedError

    def rows(self) -> list[GridRow]:
        raise NotImplementedError

    def cell_folder(self, out: Path, row: GridRow, column: str) -> Path:
        """Where a cell's metrics.json and figures go."""
        return out / "cells" / f"{row.name.replace(' ', '_').replace('/', '_')}__{column}"

    def cell_fields(self, row: GridRow) -> dict[str, Any]:
        """Columns of a cell's record besides method, input, metric, init, checkpoint and note."""
        return {}

    def cell_params(self, row: GridRow, column: str, spec: InputSpec) -> dict[str, Any]:
        """MLflow params of a cell's run: what every grid's cells log (the row, the input column and its
        channels, the protocol, the label budget and label); a task adds its own keys."""
        cfg = self.cfg
        return {
            "method": row.name,
            "input": column,
            "init": row.init,
            "protocol": cfg.protocol,
            "budget": cfg.budget,
            "label": cfg.label,
            "checkpoint": row.run_dir or "",
            "channels": ",".join(spec.channel_names),
        }

    def run_seed(self, row: GridRow, spec: InputSpec, seed: int, folder: Path, first: bool, acc) -> Any:
        """One seed of a cell; ``NotApplicable`` makes the whole cell a note in the table."""
        raise NotImplementedError

    def summarise(self, cell: dict, per_seed: list, folder: Path, started: float) -> CellOutcome:
        """The cell from its seeds (``started``: ``time.perf_counter()`` before the first seed)."""
        raise NotImplementedError

    def extra_cells(self, rows: list[GridRow], out: Path) -> list[ExtraCell]:
        """Cells appended after the trained ones (none by default)."""
        return []

    def sections(self, cells: list[dict]) -> list[str]:
        """Markdown lines appended to results.md after the table."""
        return []


_PATH_FIELDS = ("dataset", "out", "checkpoints")  # logged absolute: a relative path names no folder later


def _absolute(value: Any) -> Any:
    """A local path made absolute (URLs as given); lists element-wise."""
    if isinstance(value, list | tuple):
        return [_absolute(v) for v in value]
    if (
        isinstance(value, str | Path)
        and value
        and "://" not in str(value)
        and not str(value).startswith("timm:")
    ):
        return str(Path(value).resolve())
    return value


def _config_params(cfg: GridConfig) -> dict[str, Any]:
    """The parent run's params: scalar fields as text, each section's fields as ``<section>.<field>``."""
    params: dict[str, Any] = {}
    sections = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections[f.name] = value
        else:
            params[f.name] = str(_absolute(value) if f.name in _PATH_FIELDS else value)
    for name, section in sections.items():
        params.update({f"{name}.{k}": v for k, v in dataclasses.asdict(section).items()})
    return params


def _log_dataset(dataset: str) -> None:
    """The evaluated dataset as the parent run's dataset input (a dataset without a manifest is skipped:
    its cells say why they have no score)."""
    try:
        manifest = read_manifest(DatasetRoot(dataset))
    except (OSError, ValueError):
        return
    log_dataset_input(dataset, manifest, context="evaluation")


def _log_cell(
    exp_id: str,
    task: GridTask,
    cell: dict,
    params: dict,
    metrics: dict,
    artifacts: list[str],
    links: dict[str, str] | None = None,
) -> None:
    """The cell's child run: the tags ``eossl eval report`` reads, the pre-training run's link, params,
    metrics, files."""
    import mlflow

    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cell['method']} / {cell['input']}", nested=True):
        mlflow.set_tags(
            {
                "eossl.eval.cell": "1",
                "eossl.eval.method": cell["method"],
                "eossl.eval.input": cell["input"],
                "eossl.eval.metric": cell["metric"],
                **task.tags,
                **(links or {}),
            }
        )
        mlflow.log_params(params)
        if cell.get("note"):
            mlflow.set_tag("eossl.eval.note", cell["note"][:5000])
        if metrics:
            mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(path)


def _run_cell(task: GridTask, exp_id: str, row: GridRow, column: str, out: Path, acc) -> dict:
    """Every seed of one (row, input) cell, summed up and logged; a ``NotApplicable`` cell keeps why."""
    cfg = task.cfg
    spec = InputSpec.parse(column, cfg.s2_bands)
    folder = task.cell_folder(out, row, column)
    cell = {
        "method": row.name,
        "input": column,
        "metric": task.metric,
        "init": row.init,
        "checkpoint": row.run_dir,
        **task.cell_fields(row),
        "note": "",
    }
    params = task.cell_params(row, column, spec)
    links = pretrain_tags(row.run_dir)
    started = time.perf_counter()
    try:
        per_seed = [task.run_seed(row, spec, s, folder, i == 0, acc) for i, s in enumerate(cfg.seeds)]
        outcome = task.summarise(cell, per_seed, folder, started)
    except NotApplicable as exc:
        cell.update(mean=None, std=None, n=0, note=str(exc))
        _log_cell(exp_id, task, cell, params, {}, [], links)
        return cell
    cell.update(outcome.values)
    _log_cell(exp_id, task, cell, params, outcome.metrics, outcome.artifacts, links)
    return cell


def _cell_done(cell: dict, metric: str) -> str:
    """How a finished cell reads in the progress log: its score, or why it has none."""
    if cell.get("note"):
        return f"no score ({cell['note'][:120]})"
    mean = cell.get("mean")
    return f"{metric} {100 * mean:.2f} %" if isinstance(mean, int | float) else "done"  # % as in the tables


def run_grid(
    task: GridTask,
    command: tuple[str, ...] = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Run a task's grid; write tables, per-cell metrics and figures; log to MLflow (parent + a run per cell).

    ``parent_run_id`` nests the grid's run under another (a study cell); ``tags`` are set on it.

    Returns:
        ``{"cells", "results_csv", "results_md", "mlflow_parent_run_id"}``.
    """
    import mlflow
    from accelerate import Accelerator

    cfg = task.cfg
    cfg.validate()
    out = Path(cfg.out)
    # Every input is checked before the first output; a checkpoint (not a finished run) is exported here.
    sources = check_grid_inputs(cfg)
    cfg.checkpoints = tuple(str(export_checkpoint(s, out, cfg.dataset)) for s in sources)
    exp_id = eval_experiment(out, cfg.experiment)
    # accelerate picks the device (GPU when present) and autocasts at the chosen precision, as in training.
    acc = Accelerator(mixed_precision=cfg.precision)
    rows = task.rows()
    cells: list[dict] = []
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"{task.name}-{cfg.protocol}-{cfg.budget}", parent_run_id=parent_run_id
    ) as parent:
        mlflow.log_params(_config_params(cfg))
        mlflow.set_tags({"eossl.eval.parent": "1", **task.tags, "command": " ".join(command), **(tags or {})})
        _log_dataset(cfg.dataset)
        countdown = Countdown(len(rows) * len(cfg.inputs))
        log_line(
            f"{task.name}: {countdown.total} cells ({len(rows)} rows x {len(cfg.inputs)} inputs), "
            f"{len(cfg.seeds)} seed(s) each, protocol {cfg.protocol}, budget {cfg.budget}"
        )
        for row in rows:
            for column in cfg.inputs:
                log_line(
                    f"cell {countdown.done + 1}/{countdown.total}: {row.name} / {column} "
                    f"({countdown.left - 1} after it, ETA {countdown.eta()})"
                )
                cells.append(_run_cell(task, exp_id, row, column, out, acc))
                countdown.advance()
                log_line(
                    f"cell {countdown.done}/{countdown.total} {row.name} / {column}: "
                    f"{_cell_done(cells[-1], task.metric)}; elapsed {countdown.elapsed()}"
                )
        for extra in task.extra_cells(rows, out):
            _log_cell(exp_id, task, extra.cell, extra.params, extra.metrics, [])
            cells.append(extra.cell)
        csv_path, md_path = write_tables(cells, out, task.title(), task.sections(cells))
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))
        parent_id = parent.info.run_id
    return {"cells": cells, "results_csv": csv_path, "results_md": md_path, "mlflow_parent_run_id": parent_id}
