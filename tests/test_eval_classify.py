"""Scene-classification evaluation: probes on constructed features, budgets, splits, the CLI grid, MLflow."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from eossl.eval.classify import ClassifyConfig, _datasets
from eossl.eval.models import NotApplicable, build_eval_encoder
from eossl.eval.probes import ProbeConfig, knn_scores, linear_probe
from eossl.streaming.inputs import InputSpec

from conftest import run_cli


def _separable(n_per_class: int = 30, classes: int = 4, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize("probe", ["linear", "knn"])
def test_probes_separate_classes_and_stay_at_chance_on_shuffled_labels(probe):
    xtr, ytr = _separable(seed=0)
    xte, yte = _separable(seed=0)  # same centres, new noise below
    xte = xte + np.random.default_rng(1).normal(size=xte.shape).astype(np.float32)
    cfg = ProbeConfig()

    def accuracy(labels):
        if probe == "linear":
            scores = linear_probe(xtr, labels, xte, 4, False, cfg, seed=0)
        else:
            scores = knn_scores(xtr, labels, xte, 4, False, cfg)
        return float((scores.argmax(1) == yte).mean())

    assert accuracy(ytr) > 0.95
    shuffled = np.random.default_rng(2).permutation(ytr)
    assert accuracy(shuffled) < 0.45  # chance is 0.25


def test_multilabel_linear_probe_learns_independent_classes():
    rng = np.random.default_rng(0)
    y = rng.random((200, 3)) < 0.4
    x = (y * 3.0 + rng.normal(size=(200, 3))).astype(np.float32)
    scores = linear_probe(x[:120], y[:120], x[120:], 3, True, ProbeConfig(), seed=0)
    assert scores.shape == (80, 3) and ((scores >= 0.5) == y[120:]).mean() > 0.9


@pytest.fixture(scope="module")
def pretrained(dataset, module_tmp) -> Path:
    """A 3-step partial-fusion MoCo run (so one model serves s1, s2 and s1s2) and a conv1x1 pair run.

    Trained in this process (torch is imported already; a training command would import it again): the
    tests read the runs, not how they were started."""
    from eossl.train.config import load_config
    from eossl.train.loop import train

    runs = module_tmp("runs")
    common = {
        "data": str(dataset),
        "max_steps": "3",
        "backbone": "resnet18",
        "batch_size": "8",
        "size": "64",
        "queue_size": "32",
        "hidden": "64",
        "workers": "0",
        "split": "train",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(runs)  # the default store: ./mlflow.db
        for name, extra in (
            ("fusion", {"mode": "fusion_partial"}),
            ("pair", {"mode": "pair", "adapter": "conv1x1"}),
        ):
            train(load_config("moco", None, {**common, **extra, "out": str(runs / name)}), resume=False)
    return runs


@pytest.mark.parametrize("budget, seed", [("4", 0), ("8", 1), ("all", 0)])
def test_budgets_are_exact_and_hold_out_scenes_never_train(dataset, budget, seed):
    cfg = ClassifyConfig(dataset=str(dataset), out="unused", inits=("random",), budget=budget)
    train, test = _datasets(cfg, InputSpec.parse("s1s2"), seed)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert len(train) == (manifest["counts"]["train"] if budget == "all" else int(budget))
    scenes = {k.rsplit("_p", 1)[0] for k in train.keys}
    held_out = set(manifest["splits"]["test_scenes"])
    assert held_out and not scenes & held_out
    assert {k.rsplit("_p", 1)[0] for k in test.keys} <= held_out


@pytest.mark.slow
def test_eval_encoder_layouts(pretrained):
    mean, std = np.zeros(12, np.float32), np.ones(12, np.float32)
    s1s2 = InputSpec.parse("s1s2").channel_names
    fusion = build_eval_encoder(
        "checkpoint", InputSpec.parse("s1").channel_names, mean[:2], std[:2], str(pretrained / "fusion")
    )
    assert fusion.layout == s1s2 and (fusion.index[2:] == -1).all()  # S2 channels zero-filled
    pair = build_eval_encoder(
        "checkpoint", InputSpec.parse("s1").channel_names, mean[:2], std[:2], str(pretrained / "pair")
    )
    assert pair.sensor == "s1" and pair.layout == ["s1:VV", "s1:VH"]
    with pytest.raises(NotApplicable):
        build_eval_encoder("checkpoint", s1s2, mean, std, str(pretrained / "pair"))
    only = build_eval_encoder(
        "checkpoint-backbone-only",
        InputSpec.parse("s2", "rgb").channel_names,
        mean[:3],
        std[:3],
        str(pretrained / "pair"),
    )
    assert only.layout == ["s2:B4", "s2:B3", "s2:B2"] and only.sensor is None
    fresh = build_eval_encoder(
        "checkpoint-random-adapter",
        InputSpec.parse("s2").channel_names,
        mean[:10],
        std[:10],
        str(pretrained / "pair"),
    )
    loaded = build_eval_encoder(
        "checkpoint", InputSpec.parse("s2").channel_names, mean[:10], std[:10], str(pretrained / "pair")
    )
    w_fresh, w_loaded = fresh.encoder.adapters["s2"].conv.weight, loaded.encoder.adapters["s2"].conv.weight
    assert not np.allclose(w_fresh.detach().numpy(), w_loaded.detach().numpy())
    np.testing.assert_array_equal(
        fresh.encoder.backbone.conv1.weight.detach().numpy(),
        loaded.encoder.backbone.conv1.weight.detach().numpy(),
    )


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("protocol, precision", [("linear", "no"), ("knn", "no"), ("finetune", "bf16")])
def test_classify_grid_cli_tables_figures_and_mlflow(
    dataset, pretrained, tmp_path, monkeypatch, capsys, protocol, precision
):
    import mlflow

    from eossl.launch.cli import main

    out = tmp_path / "eval"
    args = [
        "eval",
        "classify",
        "--checkpoint",
        str(pretrained / "fusion"),
        "--dataset",
        str(dataset),
        "--budget",
        "8",
        "--protocol",
        protocol,
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--precision",
        precision,
    ]
    if precision == "bf16":  # the real command, started as users start it: its own process and autocast
        stdout = run_cli(*args, env={**os.environ, "MLFLOW_TRACKING_URI": ""}, cwd=tmp_path).stdout
    else:  # the same command line through the same entry point, in this process (torch is imported already)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # store: ./mlflow.db, as for the command above
        assert main(args) == 0
        stdout = capsys.readouterr().out
    assert "| random init |" in stdout and "| fusion |" in stdout
    rows = _read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["random init", "fusion"]
    assert list(rows[0]) == ["method", "s1", "s2", "s1s2"]
    for row in rows:
        for col in ("s1", "s2", "s1s2"):
            assert 0.0 <= float(row[col]) <= 100.0
    assert "±" in (out / "results.md").read_text()
    pngs = sorted(p.parent.name for p in (out / "cells").glob("*/confusion.png"))
    assert len(pngs) == 6
    cell = json.loads((out / "cells" / "fusion__s1" / "metrics.json").read_text())
    assert [m["train_samples"] for m in cell["per_seed"]] == [8, 8]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eossl-eval")
    parents = client.search_runs([exp.experiment_id], "tags.`eossl.eval.parent` = '1'")
    assert len(parents) == 1
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert len(children) == 6
    assert all(c.data.metrics["seeds"] == 2 and "overall_accuracy_mean" in c.data.metrics for c in children)
    assert parents[0].data.params["precision"] == precision

    report = tmp_path / "report"
    # `eval report` reads nothing but the MLflow store: in this process it proves the same as a new one.
    report_args = [
        "--parent",
        parents[0].info.run_id,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    assert main(["eval", "report", *report_args, "--out", str(report)]) == 0
    assert _read_csv(report / "results.csv") == rows  # the same table, rebuilt from MLflow only


def test_grid_subsets_scene_holdout_and_row_names():
    from eossl.eval.grid import assert_scene_holdout, row_name, training_subset

    assert training_subset("1024", 2) == "budget_1024_seed2" and training_subset("all", 2) == "train"
    assert_scene_holdout(["ROIs1158_spring_1_p30", "ROIs1158_spring_1_p31"], ["ROIs1158_spring_2_p30"])
    with pytest.raises(AssertionError, match="ROIs1158_spring_1"):  # p30 and p7 of scene 1 on both sides
        assert_scene_holdout(["ROIs1158_spring_1_p30", "ROIs1970_fall_1_p2"], ["ROIs1158_spring_1_p7"])
    assert row_name("runs/moco/", "checkpoint") == "moco"
    assert row_name("runs/moco", "checkpoint-random-adapter") == "moco (random-adapter)"
