"""The evaluation grid as a frame: configs from defaults, a file, --set and flags; a task plugged in.

A third task needs only a config and a ``GridTask``; the one here is a few lines and no model, and the
runner still gives it the table, cells.json and the MLflow runs ``eossl eval report`` reads back.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eossl.eval.cli import add_eval_arguments
from eossl.eval.config import ClassifyConfig, SegmentConfig, SegTrainConfig, field_default, load_grid_config
from eossl.eval.grid import CellOutcome, GridRow, GridTask, run_grid
from eossl.eval.models import NotApplicable
from eossl.eval.report import collect_from_mlflow
from eossl.train.export import read_model_card

from conftest import run_cli


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_file_then_set_then_flags(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "checkpoints: [run]\nbudget: all\nseeds: [0, 1]\nprobe:\n  batch_size: 8\n  finetune_epochs: 3\n"
    )
    cfg = load_grid_config(
        ClassifyConfig,
        {"dataset": "d", "out": "o"},
        str(path),
        [("finetune_epochs", "5"), ("inputs", "s1,s2")],
        {"probe.batch_size": 4},
    )
    assert cfg.budget == "all" and cfg.seeds == (0, 1) and cfg.inputs == ("s1", "s2")
    assert cfg.probe.finetune_epochs == 5  # --set after the file
    assert cfg.probe.batch_size == 4  # a typed flag after --set
    assert cfg.probe.workers == field_default(ClassifyConfig, "probe.workers")  # untouched: dataclass default
    seg = load_grid_config(
        SegmentConfig,
        {"dataset": "d", "out": "o"},
        None,
        [("checkpoints", "run"), ("crop", "32"), ("budget", "64")],
    )
    assert seg.train.crop == 32 and seg.budget == "64" and seg.checkpoints == ("run",)


def test_cli_passes_only_typed_flags(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("protocol: knn\nprobe:\n  batch_size: 8\n")
    args = _parse(
        "classify",
        "--dataset",
        "d",
        "--out",
        "o",
        "--config",
        str(path),
        "--set",
        "batch_size=16",
        "--inputs",
        "s2",
        "--init",
        "random",
    )
    assert {"probe.batch_size", "probe.workers", "protocol", "budget"}.isdisjoint(vars(args))
    from eossl.eval.cli import _grid_config

    cfg = _grid_config(ClassifyConfig, args)
    assert (cfg.protocol, cfg.probe.batch_size, cfg.inputs, cfg.inits) == ("knn", 16, ("s2",), ("random",))
    assert cfg.budget == field_default(ClassifyConfig, "budget") == "1024"
    args = _parse(
        "classify",
        "--dataset",
        "d",
        "--out",
        "o",
        "--set",
        "batch_size=16",
        "--batch-size",
        "2",
        "--init",
        "random",
    )
    assert _grid_config(ClassifyConfig, args).probe.batch_size == 2  # the typed flag wins over --set
    seg = _grid_config(
        SegmentConfig,
        _parse(
            "segment",
            "--dataset",
            "d",
            "--out",
            "o",
            "--checkpoint",
            "r",
            "--frozen",
            "--epochs",
            "3",
            "--protocol",
            "finetune",
        ),
    )
    assert (seg.frozen, seg.train.epochs, seg.train.batch_size, seg.checkpoints) == (True, 3, 16, ("r",))


@dataclass
class _TwoSections(ClassifyConfig):
    """A config with two sections that share field names (both have batch_size)."""

    train: SegTrainConfig = field(default_factory=SegTrainConfig)


def test_ambiguous_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="ambiguous.*probe.batch_size or train.batch_size"):
        load_grid_config(
            _TwoSections, {"dataset": "d", "out": "o"}, None, [("inits", "random"), ("batch_size", "8")]
        )
    cfg = load_grid_config(
        _TwoSections, {"dataset": "d", "out": "o"}, None, [("inits", "random"), ("train.batch_size", "8")]
    )
    assert (cfg.train.batch_size, cfg.probe.batch_size) == (8, 32)
    with pytest.raises(ValueError, match="did you mean probe.batch_size"):
        load_grid_config(ClassifyConfig, {"dataset": "d", "out": "o"}, None, [("batsh_size", "8")])
    with pytest.raises(ValueError, match="protocol must be one of"):
        load_grid_config(SegmentConfig, {"dataset": "d", "out": "o"}, None, [("protocol", "knn")])
    with pytest.raises(ValueError, match="segmentation needs at least one --checkpoint"):
        load_grid_config(SegmentConfig, {"dataset": "d", "out": "o"}, None, [])


@pytest.mark.slow
def test_eval_cli_refuses_a_misspelt_key(tmp_path):
    proc = run_cli(
        "eval",
        "classify",
        "--dataset",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "batsh_size=8",
        check=False,
    )
    assert proc.returncode != 0
    assert "did you mean probe.batch_size" in proc.stdout + proc.stderr


def test_read_model_card_from_the_writer(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished eossl pre-training run"):
        read_model_card(tmp_path)
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "model_card.json").write_text(json.dumps({"timm_model": "vit_tiny_patch16_224"}))
    assert read_model_card(str(tmp_path)) == {"timm_model": "vit_tiny_patch16_224"}


class _ConstantTask(GridTask):
    """A third task in a few lines: a score per seed, a row that cannot be evaluated."""

    name = "constant"
    tags = {"eossl.eval.task": "constant"}

    @property
    def metric(self) -> str:
        return "score"

    def title(self) -> str:
        return "constant scores"

    def rows(self) -> list[GridRow]:
        return [GridRow("half seed", "random", None, "none"), GridRow("nothing", "random", None, "none")]

    def cell_params(self, row, column, spec) -> dict:
        return {"method": row.name, "input": column}

    def run_seed(self, row, spec, seed, folder, first, acc) -> float:
        if row.name == "nothing":
            raise NotApplicable("no rows to score")
        return 0.5 * seed

    def summarise(self, cell, per_seed, folder, started) -> CellOutcome:
        mean = sum(per_seed) / len(per_seed)
        return CellOutcome({"mean": mean, "std": 0.0, "n": len(per_seed)}, {"score_mean": mean, "seeds": 2})


def test_a_task_plugs_into_the_grid(tmp_path, monkeypatch, capsys, dataset):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: mlflow.db in the current folder
    # The grid checks its dataset and budget before it starts, even where a task ignores them.
    cfg = ClassifyConfig(
        dataset=str(dataset), out=str(tmp_path), inputs=("s1",), seeds=(0, 1), inits=("random",), budget="2"
    )
    result = run_grid(_ConstantTask(cfg), ("test",))
    with open(result["results_csv"]) as f:
        assert list(csv.reader(f)) == [  # no columns for the inputs that were not run
            ["method", "s1"],
            ["half seed", "25.00"],
            ["nothing", ""],
        ]
    md = (tmp_path / "results.md").read_text()
    assert "| method | s1 |\n| --- | --- |" in md and "s1/s2" not in md
    # Progress per cell: which cell runs, how many are left, and how it ended.
    out = capsys.readouterr().out
    assert "constant: 2 cells (2 rows x 1 inputs)" in out
    assert "cell 1/2: half seed / s1 (1 after it, ETA ?)" in out
    assert "cell 2/2: nothing / s1 (0 after it, ETA " in out
    assert "cell 1/2 half seed / s1: score 25.00 %" in out and "no score (no rows to score)" in out
    cells = json.loads((Path(tmp_path) / "cells.json").read_text())
    assert [c["note"] for c in cells] == ["", "no rows to score"]
    logged = collect_from_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", result["mlflow_parent_run_id"], None)
    assert [(c["method"], c["mean"], c["metric"]) for c in logged] == [
        ("half seed", 0.25, "score"),
        ("nothing", None, "score"),
    ]
